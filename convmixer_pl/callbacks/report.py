"""The report of `convmixer test`: per-class precision, recall, F1 and support, and the confusion matrix.

Printed as a table (up to `max_printed` classes) once the test's progress bar and results are done, and written to
`<log dir>/report/`: `per_class.csv`, `confusion_matrix.csv` and `confusion_matrix.png`. Computed by torchmetrics
(the macro and support-weighted averages too) from the logits that `test_step` returns, summed over all processes
under DDP.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from ..console import say
from ..files import atomic_write
from ..plots import CONFUSION, confusion_matrix, log_folder, save_confusion_csv, save_figure

PER_CLASS = "per_class.csv"
SCORES = {"precision": MulticlassPrecision, "recall": MulticlassRecall, "f1": MulticlassF1Score}
AVERAGES = {"macro avg": "macro", "weighted avg": "weighted"}


def report_metrics(num_classes: int) -> MetricCollection:
    """Per-class scores, their macro and weighted averages, and the confusion matrix; the scores share their
    statistics (torchmetrics compute groups)."""
    metrics = {f"{name}/{average}": metric(num_classes, average=average)
               for name, metric in SCORES.items() for average in ("none", "macro", "weighted")}
    return MetricCollection({**metrics, "confusion": MulticlassConfusionMatrix(num_classes)})


def per_class_table(names: list[str], values: dict[str, torch.Tensor]) -> list[list]:
    """Rows of class, precision, recall, F1, support; then the macro and the support-weighted averages."""
    support = values["confusion"].sum(1).tolist()
    columns = [values[f"{name}/none"].tolist() for name in SCORES]
    rows = [[name, *scores, int(count)] for name, *scores, count in zip(names, *columns, support, strict=True)]
    return rows + [[label, *(float(values[f"{name}/{average}"]) for name in SCORES), int(sum(support))]
                   for label, average in AVERAGES.items()]


class PerClassReport(Callback):
    """Per-class metrics and the confusion matrix of every `convmixer test` run.

    Args:
        enabled: compute, print and write the report.
        out_dir: another folder for its files.
        max_printed: print the per-class table when there are at most this many classes (it is always written).
    """

    def __init__(self, enabled: bool = True, out_dir: str | None = None, max_printed: int = 50) -> None:
        self.enabled, self.out_dir, self.max_printed = enabled, out_dir, max_printed
        self.metrics: MetricCollection | None = None
        self.confusion: torch.Tensor | None = None
        self._pending: tuple[str | None, Path] | None = None  # (table to print, folder), printed in teardown

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        if self.enabled:  # one set of metrics per test run
            self.metrics = report_metrics(pl_module.num_classes).to(pl_module.device)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.metrics is not None and outputs is not None:
            self.metrics.update(outputs.detach(), batch[1])

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        if self.metrics is None:
            return
        values = {name: value.cpu() for name, value in self.metrics.compute().items()}  # every rank: a collective
        self.metrics = None
        out = log_folder(trainer, self.out_dir, "report")
        if not trainer.is_global_zero:
            return
        names = pl_module.class_names
        self.confusion, table = values["confusion"], per_class_table(names, values)
        with atomic_write(out / PER_CLASS, newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["class", "precision", "recall", "f1", "support"])
            writer.writerows([row[0], *(f"{v:.6f}" for v in row[1:4]), row[4]] for row in table)
        save_confusion_csv(self.confusion, names, out / "confusion_matrix.csv")
        save_figure(confusion_matrix(self.confusion, names), out / CONFUSION)
        self._pending = (format_table(table) if len(names) <= self.max_printed else None, out)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        # after the progress bar has finished its line and Lightning has printed its results: on lines of its own
        if self._pending is not None:
            (table, out), self._pending = self._pending, None
            if table:
                print(table, flush=True)
            say(f"test report written to {out}/: {PER_CLASS}, confusion_matrix.csv, {CONFUSION}")


def format_table(rows: list[list]) -> str:
    width = max(12, *(len(str(row[0])) for row in rows))
    lines = [f"{name:<{width}} {p:>9.4f} {r:>9.4f} {f:>9.4f} {s:>8d}" for name, p, r, f, s in rows]
    header = f"{'class':<{width}} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}"
    return "\n".join([header, *lines[:-len(AVERAGES)], "", *lines[-len(AVERAGES):]])  # the averages apart
