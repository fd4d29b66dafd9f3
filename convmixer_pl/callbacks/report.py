"""The report of `convmixer test`: per-class precision, recall, F1 and support, and the confusion matrix.

Printed as a table (up to `max_printed` classes) and written to `<log dir>/report/`: `per_class.csv`,
`confusion_matrix.csv` and, with matplotlib, `confusion_matrix.png`. Computed by torchmetrics from the logits
that `test_step` returns, summed over all processes under DDP.
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
from ..plots import CONFUSION, MATPLOTLIB_MISSING, has_matplotlib, plot_confusion_matrix, save_confusion_csv
from .plots import log_folder

PER_CLASS = "per_class.csv"


def per_class_table(names: list[str], precision, recall, f1, support) -> list[list]:
    """Rows of class, precision, recall, F1, support; then the macro and the support-weighted averages."""
    rows = [[name, p, r, f, int(s)] for name, p, r, f, s in zip(names, precision, recall, f1, support, strict=True)]
    total = sum(int(s) for s in support)
    for label, weights in (("macro avg", [1.0] * len(names)), ("weighted avg", [float(s) for s in support])):
        norm = sum(weights) or 1.0
        rows.append([label, *(sum(w * v for w, v in zip(weights, column, strict=True)) / norm
                              for column in (precision, recall, f1)), total])
    return rows


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
        self.table: list[list] | None = None  # the last run's rows, as written to per_class.csv
        self.confusion: torch.Tensor | None = None

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        if not self.enabled:
            return
        n = pl_module.num_classes
        # one confusion matrix per test run; the three scores share their statistics (torchmetrics compute groups)
        self.metrics = MetricCollection({
            "precision": MulticlassPrecision(n, average=None), "recall": MulticlassRecall(n, average=None),
            "f1": MulticlassF1Score(n, average=None), "confusion": MulticlassConfusionMatrix(n),
        }).to(pl_module.device)

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
        names, confusion = pl_module.class_names, values["confusion"]
        self.confusion = confusion
        self.table = per_class_table(names, values["precision"].tolist(), values["recall"].tolist(),
                                     values["f1"].tolist(), confusion.sum(1).tolist())
        out.mkdir(parents=True, exist_ok=True)
        with open(out / PER_CLASS, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["class", "precision", "recall", "f1", "support"])
            writer.writerows([row[0], *(f"{v:.6f}" for v in row[1:4]), row[4]] for row in self.table)
        save_confusion_csv(confusion, names, out / "confusion_matrix.csv")
        written = [PER_CLASS, "confusion_matrix.csv"]
        if has_matplotlib():
            plot_confusion_matrix(confusion, names, out / CONFUSION)
            written.append(CONFUSION)
        else:
            say(f"no {CONFUSION}: {MATPLOTLIB_MISSING}")
        if len(names) <= self.max_printed:
            print(format_table(self.table), flush=True)
        say(f"test report written to {out}/: {', '.join(written)}")


def format_table(rows: list[list]) -> str:
    width = max(12, *(len(str(row[0])) for row in rows))
    lines = [f"{'class':<{width}} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}"]
    for i, (name, p, r, f, s) in enumerate(rows):
        if i == len(rows) - 2:
            lines.append("")
        lines.append(f"{name:<{width}} {p:>9.4f} {r:>9.4f} {f:>9.4f} {s:>8d}")
    return "\n".join(lines)


def read_per_class(path: str | Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))
