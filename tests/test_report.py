"""The report of `convmixer test`: per-class precision, recall, F1 and support, and the confusion matrix."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from convmixer_pl.callbacks.report import PER_CLASS, PerClassReport, read_per_class
from convmixer_pl.module import ConvMixerClassifier


def test_report_counts_one_test_run_and_agrees_with_its_confusion_matrix(tmp_path):
    model = ConvMixerClassifier(dim=8, depth=1, kernel_size=3, patch_size=2, num_classes=3, image_size=8,
                                class_names=["cat", "dog", "owl"])
    data = DataLoader(TensorDataset(torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])), batch_size=4)
    report = PerClassReport(out_dir=str(tmp_path))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[report], default_root_dir=tmp_path)
    for _ in range(2):  # a second run starts from zero again
        trainer.test(model, dataloaders=data, verbose=False)
        counts = report.confusion
        assert counts.sum() == 6 and counts.sum(1).tolist() == [2, 2, 2]
    rows = read_per_class(tmp_path / PER_CLASS)
    assert [row["class"] for row in rows] == ["cat", "dog", "owl", "macro avg", "weighted avg"]
    for i, row in enumerate(rows[:3]):
        tp = counts[i, i].item()
        predicted, actual = counts[:, i].sum().item(), counts[i].sum().item()
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        assert (float(row["precision"]), float(row["recall"]), float(row["f1"])) == pytest.approx(
            (precision, recall, f1), abs=1e-6)
        assert int(row["support"]) == actual
    macro = rows[3]
    assert float(macro["f1"]) == pytest.approx(sum(float(r["f1"]) for r in rows[:3]) / 3, abs=1e-6)
    assert int(rows[4]["support"]) == 6
    assert (tmp_path / "confusion_matrix.csv").is_file()
