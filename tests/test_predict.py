"""`convmixer predict`: a folder of mixed images (nested, any size, mode and format), the run's test set, DDP."""

from __future__ import annotations

import csv
import errno
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY_DIGITS
from PIL import Image

from convmixer_pl.checkpoints import load_module
from convmixer_pl.cli import ConvMixerCLI, main
from convmixer_pl.data import DataError, FolderPredictDataModule
from convmixer_pl.plots import read_confusion_csv

# (relative path, PIL mode, width, height): nested folders, PNG, JPEG and BMP, modes L/RGBA/P/RGB/16-bit grey,
# different sizes
MIXED = [("one.png", "L", 20, 30), ("a/two.png", "RGBA", 40, 25), ("a/b/three.png", "P", 17, 17),
         ("c/four.jpg", "RGB", 64, 48), ("c/five.jpeg", "L", 9, 9), ("c/d/six.PNG", "RGB", 12, 80),
         ("seven.jpg", "RGB", 33, 21), ("c/d/eight.png", "I;16", 30, 30), ("nine.bmp", "RGB", 15, 15)]


def write_mixed_images(root: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    for name, mode, width, height in MIXED:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
        if mode == "I;16":
            Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16)).save(path)
        elif mode == "P":
            image.convert("P").save(path, transparency=0)  # paletted with a transparent colour
        else:
            image.convert(mode).save(path)
    (root / "notes.txt").write_text("not an image")
    (root / "a" / "._two.png").write_bytes(b"AppleDouble metadata, not an image")
    # in the order torchvision's ImageFolder lists files: folder by folder (sorted), names sorted within each
    return sorted((root / name for name, *_ in MIXED), key=lambda path: (str(path.parent), path.name))


def grey(path: Path) -> Image.Image:
    with Image.open(path) as image:
        if image.mode == "I;16":  # 0..65535 -> 0..255
            return Image.fromarray((np.asarray(image) >> 8).astype(np.uint8), "L")
        return image.convert("RGBA").convert("L")


def expected_top1(ckpt: Path, paths: list[Path]) -> list[tuple[str, float]]:
    """The checkpoint's top-1 class and probability for each file, computed directly."""
    module = load_module(ckpt)
    transform = module.eval_transform()
    with torch.no_grad():
        batch = torch.stack([transform(grey(path)) for path in paths])
        probs = module(batch).softmax(1)
    names = module.class_names
    return [(names[int(i)], float(p)) for p, i in zip(*probs.max(1), strict=True)]


def elsewhere(tmp_path: Path) -> list[str]:
    """Checkpoint and log folders under tmp_path, for commands run in-process (in the repository's folder)."""
    return ["--checkpoint.dirpath", str(tmp_path / "run"), "--trainer.default_root_dir", str(tmp_path),
            "--trainer.enable_progress_bar", "false"]


def folder(root: Path | str) -> list[str]:
    """`predict` on a folder of images."""
    return ["--data", "FolderPredictDataModule", "--data.root", str(root)]


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_folder_module_reads_mixed_images_as_the_model_expects(digits_run, tmp_path):
    paths = write_mixed_images(tmp_path / "images")
    data = FolderPredictDataModule(str(tmp_path / "images"), batch_size=4)
    # it knows nothing of classes or sizes (the CLI's links leave the checkpoint's in the model) ...
    assert not any(hasattr(data, key) for key in ("num_classes", "in_chans", "image_size", "class_names", "mean"))
    # ... and takes the preprocessing from the model it predicts with
    model = load_module(digits_run / "last.ckpt")
    config = model.data_config
    assert (config.in_chans, config.image_size) == (1, 8) and model.class_names == [str(i) for i in range(10)]
    data.trainer = SimpleNamespace(lightning_module=model, world_size=1, global_rank=0,
                                   strategy=SimpleNamespace(root_device=torch.device("cpu")))
    data.setup("predict")
    assert data.predict_set.paths == paths  # nested, sorted; the .txt and the hidden ._ file are skipped
    images, indices = next(iter(data.predict_dataloader()))
    assert images.shape == (4, 1, 8, 8) and indices.tolist() == [0, 1, 2, 3]
    assert -1.0 <= images.min() < images.max() <= 1.0  # digits' normalisation, (x - 0.5) / 0.5
    with pytest.raises(DataError, match="only predicts"):
        data.setup("fit")


def test_predict_folder_writes_ordered_csv_and_json(digits_run, tmp_path):
    paths = write_mixed_images(tmp_path / "images")
    main(["predict", "--ckpt_path", str(digits_run / "last.ckpt"), *folder(tmp_path / "images"),
          "--predictions.top_k", "3", "--predictions.json", "true", "--predictions.output", str(tmp_path / "p.csv"),
          "--data.batch_size", "3", *elsewhere(tmp_path)])
    rows = read_rows(tmp_path / "p.csv")
    assert list(rows[0]) == ["index", "path", "class1", "prob1", "class2", "prob2", "class3", "prob3"]
    assert [row["path"] for row in rows] == [str(path) for path in paths]
    for row in rows:
        probs = [float(row[f"prob{j}"]) for j in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
        assert {row[f"class{j}"] for j in (1, 2, 3)} <= set("0123456789")
    for row, (name, prob) in zip(rows, expected_top1(digits_run / "last.ckpt", paths), strict=True):
        assert row["class1"] == name and float(row["prob1"]) == pytest.approx(prob, abs=2e-6)
    records = json.loads((tmp_path / "p.json").read_text())
    assert [r["path"] for r in records] == [row["path"] for row in rows]
    assert [r["top_k"][0]["class"] for r in records] == [row["class1"] for row in rows]


def test_predict_under_ddp_writes_one_complete_ordered_file(digits_run, tmp_path, convmixer):
    paths = write_mixed_images(tmp_path / "images")  # 9 images: the two ranks get uneven shares
    result = convmixer("predict", "--ckpt_path", digits_run / "last.ckpt", *folder("images"),
                       "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu",
                       "--data.batch_size", "3", "--predictions.output", "p.csv", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("predictions written to") == 1  # rank 0 alone writes
    rows = read_rows(tmp_path / "p.csv")
    assert [int(row["index"]) for row in rows] == list(range(len(paths)))
    assert [row["path"] for row in rows] == [str(path.relative_to(tmp_path)) for path in paths]
    for row, (name, prob) in zip(rows, expected_top1(digits_run / "last.ckpt", paths), strict=True):
        assert row["class1"] == name and float(row["prob1"]) == pytest.approx(prob, abs=2e-6)


def test_predict_without_data_predicts_the_runs_test_set(digits_run, tmp_path):
    out = tmp_path / "test_set.csv"
    ConvMixerCLI(args=["predict", *TINY_DIGITS, "--checkpoint.dirpath", str(digits_run),
                       "--trainer.default_root_dir", str(tmp_path), "--predictions.output", str(out)])
    rows = read_rows(out)
    assert len(rows) == 359 and "target" in rows[0] and "path" not in rows[0]  # digits: 20% of 1,797
    # the same checkpoint's `convmixer test` counted the same top-1 hits
    confmat, _ = read_confusion_csv(digits_run / "lightning_logs" / "version_1" / "report" / "confusion_matrix.csv")
    assert sum(row["class1"] == row["target"] for row in rows) == int(confmat.trace())


def test_unreadable_image_is_a_one_line_error_naming_the_file(digits_run, tmp_path, capsys):
    write_mixed_images(tmp_path / "images")
    (tmp_path / "images" / "c" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--ckpt_path", str(digits_run / "last.ckpt"), *folder(tmp_path / "images"),
              "--predictions.output", str(tmp_path / "p.csv"), *elsewhere(tmp_path)])
    assert exit_info.value.code == 2
    assert re.search(r"cannot read image \S*broken.png", capsys.readouterr().err)
    assert not (tmp_path / "p.csv").exists()


def test_a_predict_that_fails_while_writing_leaves_the_previous_file(digits_run, tmp_path, capsys, monkeypatch):
    write_mixed_images(tmp_path / "images")
    output = tmp_path / "p.csv"
    args = ["predict", "--ckpt_path", str(digits_run / "last.ckpt"), *folder(tmp_path / "images"),
            "--predictions.output", str(output), *elsewhere(tmp_path)]
    main(args)
    good = output.read_text()
    assert len(good.splitlines()) == 1 + len(MIXED)

    real_writer = csv.writer

    class FillsTheDisk:  # csv.writer over a disk that fills after three rows
        def __init__(self, handle):
            self.writer, self.rows = real_writer(handle), 0

        def writerow(self, row):
            self.rows += 1
            if self.rows > 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.writer.writerow(row)

    monkeypatch.setattr("convmixer_pl.callbacks.predictions.csv.writer", FillsTheDisk)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert f"convmixer: error: cannot write {output}: no space left on its device" in err
    assert output.read_text() == good  # the good file, whole, where it was
    assert sorted(p.name for p in tmp_path.glob("*.csv")) == ["p.csv"] and not list(tmp_path.glob(".p.csv.*"))
