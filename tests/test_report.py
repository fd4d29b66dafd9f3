"""The report of `convmixer test`: per-class precision, recall, F1 and support, and the confusion matrix."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from convmixer_pl.callbacks.report import PER_CLASS, PerClassReport
from convmixer_pl.module import ConvMixerClassifier
from convmixer_pl.preprocessing import DataConfig

NAMES = ("cat", "dog", "owl")


def tiny_test(tmp_path, report: PerClassReport, progress_bar: bool = False):
    model = ConvMixerClassifier(dim=8, depth=1, kernel_size=3, patch_size=2,
                                data_config=DataConfig(image_size=8, class_names=NAMES))
    data = DataLoader(TensorDataset(torch.randn(7, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2, 2])), batch_size=4)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=progress_bar,
                        enable_model_summary=False, callbacks=[report], default_root_dir=tmp_path)
    return trainer, model, data


def test_report_counts_one_test_run_and_agrees_with_its_confusion_matrix(tmp_path):
    report = PerClassReport(out_dir=str(tmp_path))
    trainer, model, data = tiny_test(tmp_path, report)
    for _ in range(2):  # a second run starts from zero again
        trainer.test(model, dataloaders=data, verbose=False)
        counts = report.confusion
        assert counts.sum() == 7 and counts.sum(1).tolist() == [2, 2, 3]
    with open(tmp_path / PER_CLASS, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["class"] for row in rows] == [*NAMES, "macro avg", "weighted avg"]
    for i, row in enumerate(rows[:3]):
        tp = counts[i, i].item()
        predicted, actual = counts[:, i].sum().item(), counts[i].sum().item()
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        assert (float(row["precision"]), float(row["recall"]), float(row["f1"])) == pytest.approx(
            (precision, recall, f1), abs=1e-6)
        assert int(row["support"]) == actual
    support = [int(row["support"]) for row in rows[:3]]
    for name in ("precision", "recall", "f1"):
        per_class = [float(row[name]) for row in rows[:3]]
        assert float(rows[3][name]) == pytest.approx(sum(per_class) / 3, abs=1e-6)
        assert float(rows[4][name]) == pytest.approx(
            sum(v * s for v, s in zip(per_class, support, strict=True)) / 7, abs=1e-6)
    assert int(rows[3]["support"]) == int(rows[4]["support"]) == 7
    assert (tmp_path / "confusion_matrix.csv").is_file() and (tmp_path / "confusion_matrix.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion_matrix.csv", "confusion_matrix.png", PER_CLASS]


def test_the_table_is_printed_on_lines_of_its_own_after_the_progress_bar(tmp_path, capsys):
    trainer, model, data = tiny_test(tmp_path, PerClassReport(out_dir=str(tmp_path)), progress_bar=True)
    trainer.test(model, dataloaders=data)
    captured = capsys.readouterr()
    lines = captured.out.split("\n")  # the bar redraws with \r: a table glued to it would share its line
    header = next(i for i, line in enumerate(lines) if "precision" in line)
    assert lines[header].split() == ["class", "precision", "recall", "f1", "support"], lines[header]
    assert [line.split()[0] for line in lines[header + 1:header + 4]] == list(NAMES)
    assert "Testing" not in "\n".join(lines[header:])  # the bar and Lightning's results come before it
    assert f"convmixer: test report written to {tmp_path}/" in captured.err
