"""Bad input through the `convmixer` command: one line `convmixer: error: ...` naming the problem, a non-zero exit
code, no traceback (unless CONVMIXER_DEBUG=1) and no file lost. Each test is a row of docs/reliability.md.

Most run `convmixer_pl.cli.main` in this process (the console script's own entry point) because each subprocess
costs seconds; `test_the_installed_command_prints_one_line_and_exits_2` runs the installed command.
"""

from __future__ import annotations

import ast
import hashlib
import re
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import CONFIGS, folder_args, write_image_folder
from conftest import run_main as run
from PIL import Image

from convmixer_pl.cli import main
from convmixer_pl.data import DataError, read_image

DIGITS = ["--config", str(CONFIGS / "digits.yaml"), "--model.dim", "8", "--model.depth", "1",
          "--model.kernel_size", "3", "--data.image_size", "8", "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false", "--plots.enabled", "false"]
ONE_STEP = ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--checkpoint.last_every_n_steps", "1"]


def error_line(code: int, err: str, *needles: str) -> str:
    """The one `convmixer: error:` line, after checking the exit code, the absence of a traceback and the text."""
    lines = [line for line in err.splitlines() if line.startswith("convmixer: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err[-3000:])
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # checkpoints/<name>/ of commands without --checkpoint.dirpath land here
    monkeypatch.delenv("CONVMIXER_DEBUG", raising=False)


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory) -> Path:
    """last.ckpt of one training step on digits (10 classes, 1 channel, dim 8)."""
    where = tmp_path_factory.mktemp("digits_ckpt")
    main(["fit", *DIGITS, *ONE_STEP, "--checkpoint.dirpath", str(where)])
    return where / "last.ckpt"


# ---- data -------------------------------------------------------------------------------------------------------


def test_missing_data_root(capsys, tmp_path):
    code, err = run(capsys, "fit", *folder_args(tmp_path / "absent"))
    error_line(code, err, f"data.root {tmp_path / 'absent'} does not exist")


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_missing_split_folder(capsys, tmp_path, split):
    """fit needs train/; without val/ it validates on a held-out part of train/, and without test/ `test` uses val/
    (ImageNet's layout), each said in one line."""
    root = write_image_folder(tmp_path / "images", splits=[s for s in ("train", "val", "test") if s != split])
    code, err = run(capsys, "fit", *folder_args(root, *ONE_STEP, "--checkpoint.dirpath", tmp_path / "run"))
    if split == "train":
        error_line(code, err, f"{root / 'train'} is missing: fit needs {root}/train/<class name>/ folders",
                   "convmixer validate|test|predict --ckpt_path")
        return
    assert code == 0, err[-3000:]
    held_out = (f"convmixer: no {root / 'val'}: validating on 1 of the 12 images of {root / 'train'}, held out from "
                "training (data.val_fraction 0.1, data.seed 0)")
    assert (held_out in err.splitlines()) == (split == "val"), err[-3000:]
    code, err = run(capsys, "test", *folder_args(root, "--ckpt_path", tmp_path / "run" / "last.ckpt"))
    assert code == 0, err[-3000:]
    on_val = f"convmixer: no {root / 'test'}: testing on {root / 'val'} (12 images)"
    assert (on_val in err.splitlines()) == (split == "test"), err[-3000:]


def test_nothing_to_evaluate_on(capsys, tmp_path):
    root = write_image_folder(tmp_path / "images", splits=("train",))
    code, err = run(capsys, "fit", *folder_args(root, *ONE_STEP, "--data.val_fraction", "0"))
    error_line(code, err, f"{root} has neither val/ nor test/ and data.val_fraction is 0: nothing to validate on",
               f"add {root / 'val'}/<class name>/ folders, or set data.val_fraction above 0")


def test_class_folder_the_checkpoint_does_not_know(capsys, tmp_path, digits_ckpt):
    """A root without train/ is evaluated with the checkpoint's classes (digits: 0 to 9), by folder name."""
    root = write_image_folder(tmp_path / "images", classes=("3", "7", "cat"), splits=("val",))
    code, err = run(capsys, "validate", *folder_args(root, "--ckpt_path", digits_ckpt))
    error_line(code, err, f"{root / 'val'} has class folder(s) [cat] that the model does not",
               f"{root / 'val'} has [3, 7, cat], the model [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]",
               "rename or remove those folders")


def test_class_folder_without_images(capsys, tmp_path):
    root = write_image_folder(tmp_path / "images")
    for image in (root / "train" / "dog").iterdir():
        image.unlink()
    code, err = run(capsys, "fit", *folder_args(root, *ONE_STEP))
    error_line(code, err, str(root / "train"), "dog")


def _truncated_jpeg(path: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["truncated", "not an image"])
def test_unreadable_image_stops_training_naming_the_file(capsys, tmp_path, kind, workers):
    root = write_image_folder(tmp_path / "images")
    bad = root / "train" / "owl" / "bad.jpg"
    _truncated_jpeg(bad) if kind == "truncated" else bad.write_text("this is not a JPEG")
    code, err = run(capsys, "fit", *folder_args(root, "--trainer.max_epochs", "1", "--data.num_workers", workers,
                                                "--checkpoint.dirpath", tmp_path / "run"))
    error_line(code, err, f"cannot read image {bad}", "data.bad_images: skip")
    assert bad.exists()


def test_file_without_an_image_extension_stops_naming_it(capsys, tmp_path):
    root = write_image_folder(tmp_path / "images")
    (root / "train" / "cat" / "notes.txt").write_text("shot on a phone")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0")  # hidden files are not data: ignored
    code, err = run(capsys, "fit", *folder_args(root, *ONE_STEP))
    error_line(code, err, f"{root / 'train' / 'cat' / 'notes.txt'} is not an image", "data.bad_images: skip")


def test_bad_images_skip_leaves_them_out_with_a_warning_and_a_count(capsys, tmp_path, recwarn):
    root = write_image_folder(tmp_path / "images")
    _truncated_jpeg(root / "train" / "owl" / "bad.jpg")
    (root / "train" / "cat" / "fake.png").write_text("not a PNG")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    code, err = run(capsys, "fit", *folder_args(root, *ONE_STEP, "--data.bad_images", "skip",
                                                "--checkpoint.dirpath", tmp_path / "run"))
    assert code == 0, err[-3000:]
    warned = [str(w.message) for w in recwarn if "data.bad_images skip" in str(w.message)]
    assert any(f"left out 3 of 15 files in {root / 'train'}" in message for message in warned), warned
    assert (tmp_path / "run" / "last.ckpt").is_file()


def _png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit grey or RGB PNG written byte by byte (PIL cannot write 16-bit RGB)."""
    import struct
    import zlib

    height, width = pixels.shape[:2]
    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, 2 if pixels.ndim == 3 else 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def _images_in_every_mode(folder: Path) -> dict[str, tuple[int, int, int]]:
    """One file per PIL mode of a (200, 100, 50) image; returns the RGB each should read as (a palette and JPEG
    round a little)."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(np.full((12, 12, 3), (200, 100, 50), dtype=np.uint8))
    grey = rgb.convert("L").getpixel((0, 0))
    expected = {}
    for mode, name in [("L", "l.png"), ("LA", "la.png"), ("P", "p.png"), ("RGBA", "rgba.png"),
                       ("CMYK", "cmyk.jpg")]:
        rgb.convert(mode).save(folder / name, **({"transparency": 0} if mode == "P" else {}))
        expected[name] = (grey,) * 3 if mode in ("L", "LA") else (200, 100, 50)
    Image.new("1", (12, 12), 1).save(folder / "bilevel.png")
    _png16(folder / "grey16.png", np.full((12, 12), 40000, dtype=np.uint16))
    _png16(folder / "rgb16.png", np.full((12, 12, 3), (51400, 25700, 12850), dtype=np.uint16))
    Image.fromarray(np.full((12, 12), 40000, dtype=np.int32)).save(folder / "int32.tif")
    expected.update({"bilevel.png": (255,) * 3, "grey16.png": (156,) * 3, "rgb16.png": (200, 100, 50),
                     "int32.tif": (156,) * 3})
    return expected


def test_images_in_every_mode_read_as_8_bit_rgb(tmp_path):
    expected = _images_in_every_mode(tmp_path)
    for name, colour in expected.items():
        image = read_image(str(tmp_path / name))
        assert image.mode == "RGB", name
        assert np.abs(np.asarray(image)[0, 0].astype(int) - colour).max() <= 8, (name, np.asarray(image)[0, 0])


def test_image_folder_of_every_mode_trains(capsys, tmp_path):
    root = write_image_folder(tmp_path / "images", classes=("a", "b"), splits=("val", "test"))
    for cls in ("a", "b"):
        _images_in_every_mode(root / "train" / cls)
    code, err = run(capsys, "fit", *folder_args(root, "--trainer.max_epochs", "1", "--checkpoint.monitor", "null",
                                                "--checkpoint.dirpath", tmp_path / "run"))
    assert code == 0 and "Traceback" not in err, err[-3000:]
    assert (tmp_path / "run" / "last.ckpt").is_file()


def _cifar_args(root: Path, *extra: str) -> list[str]:
    return ["fit", "--data", "CIFARDataModule", "--data.root", str(root), "--data.download", "false",
            "--data.num_workers", "0", "--data.val_fraction", "0.1", "--model.dim", "8", "--model.depth", "1",
            "--trainer.max_steps", "1", "--plots.enabled", "false", *extra]


def test_cifar_files_missing(capsys, tmp_path):
    code, err = run(capsys, *_cifar_args(tmp_path / "nothing_here"))
    error_line(code, err, "cifar10 not found or corrupted", str(tmp_path / "nothing_here" / "cifar-10-batches-py"),
               "data.download: true")


@pytest.mark.parametrize("checksums", ["true", "false"])
def test_cifar_files_corrupt(capsys, tmp_path, cifar_root, checksums):
    root = tmp_path / "cifar"
    shutil.copytree(cifar_root / "cifar-10-batches-py", root / "cifar-10-batches-py")
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:1000])  # truncated
    code, err = run(capsys, *_cifar_args(root, "--data.verify_checksums", checksums))
    error_line(code, err, "cifar10 not found or corrupted", str(root / "cifar-10-batches-py"))


# ---- config ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "config", "named"), [
    (["--model.dimm", "8"], None, ["dimm", "--help` lists the options"]),
    ([], "model:\n  dimm: 8\n", ["dimm", "--help` lists the options"]),
    (["--model.dim", "eight"], None, ["eight"]),
    ([], "trainer:\n  max_epochs: many\n", ["many"]),
], ids=["unknown key flag", "unknown key in a config file", "wrong type flag", "wrong type in a config file"])
def test_unknown_key_and_wrong_type(capsys, tmp_path, flags, config, named):
    if config:
        (tmp_path / "bad.yaml").write_text(config)
        flags = ["--config", tmp_path / "bad.yaml"]
    code, err = run(capsys, "fit", *DIGITS, *flags)
    error_line(code, err, *named)


@pytest.mark.parametrize("flags, needle", [
    (["--model.kernel_size", "4"], "kernel_size must be odd, got 4"),
    (["--model.patch_size", "16"], "patch_size 16 is larger than the 8px image"),
    (["--model.dim", "0"], "dim must be a positive integer, got 0"),
    (["--data.batch_size", "0"], "data.batch_size must be positive, got 0"),
])
def test_impossible_settings(capsys, flags, needle):
    code, err = run(capsys, "fit", *DIGITS, *flags)
    error_line(code, err, needle)


# ---- checkpoints -------------------------------------------------------------------------------------------------


def test_ckpt_path_missing_file(capsys, tmp_path):
    code, err = run(capsys, "test", *DIGITS, "--ckpt_path", tmp_path / "nope.ckpt")
    error_line(code, err, f"--ckpt_path {tmp_path / 'nope.ckpt'}: no such file")


@pytest.mark.parametrize("content", ["text", "empty", "random bytes", "truncated checkpoint", "bare state dict"])
def test_ckpt_path_not_a_checkpoint(capsys, tmp_path, digits_ckpt, content):
    path = tmp_path / "file.ckpt"
    if content == "text":
        path.write_text("epoch: 3\n")
    elif content == "empty":
        path.write_bytes(b"")
    elif content == "random bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif content == "truncated checkpoint":
        path.write_bytes(digits_ckpt.read_bytes()[:5000])
    else:
        torch.save(torch.load(digits_ckpt, weights_only=True)["state_dict"], path)
    before = snapshot(tmp_path)
    for command in ("fit", "test"):
        code, err = run(capsys, command, *DIGITS, "--ckpt_path", path, "--checkpoint.dirpath", tmp_path / "run")
        line = error_line(code, err, f"--ckpt_path {path} is not a")
        assert ("Lightning checkpoint" in line) == (content == "bare state dict"), line
    assert snapshot(tmp_path) == before  # the file is not touched, nothing is written


def test_ckpt_path_trained_for_another_class_count(capsys, tmp_path, digits_ckpt):
    before = snapshot(digits_ckpt.parent)
    root = write_image_folder(tmp_path / "images")  # 3 classes; digits has 10
    code, err = run(capsys, "test", *folder_args(root, "--ckpt_path", digits_ckpt))
    error_line(code, err, f"--ckpt_path {digits_ckpt} was trained for 10 classes but the data has 3")
    assert snapshot(digits_ckpt.parent) == before


def test_ckpt_path_trained_on_other_channels(capsys, cifar_root, digits_ckpt):
    code, err = run(capsys, "test", "--data", "CIFARDataModule", "--data.root", cifar_root, "--data.num_workers",
                    "0", "--data.verify_checksums", "false", "--data.val_fraction", "0.1", "--ckpt_path", digits_ckpt)
    error_line(code, err, "expects 1-channel images but the data has 3")


def test_ckpt_path_of_another_architecture_rebuilds_it_with_a_notice(capsys, tmp_path, digits_ckpt):
    code, err = run(capsys, "test", *DIGITS, "--model.dim", "32", "--model.depth", "3", "--ckpt_path", digits_ckpt,
                    "--trainer.limit_test_batches", "1", "--checkpoint.dirpath", tmp_path / "run")
    assert code == 0, err[-3000:]
    assert f"convmixer: the model is built as {digits_ckpt} was trained: dim 8 (not 32), depth 1 (not 3)" in err


def test_ckpt_path_whose_weights_do_not_fit_the_model(capsys, tmp_path, digits_ckpt):
    stripped = tmp_path / "no_hparams.ckpt"  # without hyper-parameters nothing tells the CLI dim 8 / depth 1
    checkpoint = torch.load(digits_ckpt, weights_only=True)
    del checkpoint["hyper_parameters"]
    torch.save(checkpoint, stripped)
    code, err = run(capsys, "test", *DIGITS, "--model.dim", "16", "--ckpt_path", stripped)
    error_line(code, err, f"--ckpt_path {stripped} holds a different architecture", "model.stem.0.weight (8, 1, 2, 2)")


class OtherModel(L.LightningModule):
    def __init__(self, hidden: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(2, hidden)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_ckpt_path_of_another_model(capsys, tmp_path):
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(OtherModel(), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 2))))
    trainer.save_checkpoint(tmp_path / "other.ckpt")
    code, err = run(capsys, "test", *DIGITS, "--ckpt_path", tmp_path / "other.ckpt")
    error_line(code, err, f"--ckpt_path {tmp_path / 'other.ckpt'} was written by another model", "hidden")


@pytest.mark.parametrize("command", ["validate", "test", "predict"])
def test_ckpt_path_last_without_a_checkpoint_is_an_error_for_evaluation(capsys, tmp_path, command):
    code, err = run(capsys, command, *DIGITS, "--ckpt_path", "last", "--checkpoint.dirpath", tmp_path / "empty")
    error_line(code, err, f"no checkpoint in {tmp_path / 'empty'}/ to {command}")


def test_damaged_last_checkpoint_found_for_evaluation_is_one_line(capsys, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.ckpt").write_text("not a checkpoint")
    code, err = run(capsys, "test", *DIGITS, "--checkpoint.dirpath", tmp_path / "run")
    error_line(code, err, f"{tmp_path / 'run' / 'last.ckpt'} is not a checkpoint torch can read")


def test_ckpt_path_last_without_a_checkpoint_starts_fit_from_scratch(capsys, tmp_path):
    code, err = run(capsys, "fit", *DIGITS, *ONE_STEP, "--ckpt_path", "last", "--checkpoint.dirpath", tmp_path / "r")
    assert code == 0, err[-3000:]
    assert f"convmixer: --ckpt_path last: no {tmp_path / 'r' / 'last.ckpt'} yet, so training starts from scratch" in err
    assert torch.load(tmp_path / "r" / "last.ckpt", weights_only=True)["global_step"] == 1


def test_weights_only_checkpoint_cannot_resume(capsys, tmp_path):
    code, err = run(capsys, "fit", *DIGITS, *ONE_STEP, "--checkpoint.dirpath", tmp_path / "w",
                    "--checkpoint.save_weights_only", "true", "--checkpoint.monitor", "null",
                    "--checkpoint.last_every_n_steps", "0")
    assert code == 0, err[-3000:]
    weights_only = next((tmp_path / "w").glob("*.ckpt"))
    code, err = run(capsys, "fit", *DIGITS, "--ckpt_path", weights_only, "--checkpoint.dirpath", tmp_path / "w2")
    error_line(code, err, f"--ckpt_path {weights_only} holds weights only")


@pytest.mark.parametrize("dirpath", ["parent is a file", "is a file"])
def test_checkpoint_folder_that_cannot_be_written(capsys, tmp_path, dirpath):
    blocker = tmp_path / "results.txt"
    blocker.write_text("keep me")
    target = blocker / "run" if dirpath == "parent is a file" else blocker
    code, err = run(capsys, "fit", *DIGITS, *ONE_STEP, "--checkpoint.dirpath", target)
    problem = "cannot be written (Not a directory" if dirpath == "parent is a file" else "is a file, not a folder"
    error_line(code, err, f"checkpoint.dirpath {target} {problem}", "choose another --checkpoint.dirpath")
    assert blocker.read_text() == "keep me"


# ---- how errors are shown ----------------------------------------------------------------------------------------


def test_convmixer_debug_shows_the_traceback(monkeypatch, tmp_path):
    monkeypatch.setenv("CONVMIXER_DEBUG", "1")
    with pytest.raises(ValueError, match="does not exist") as info:  # raised as is, with its traceback
        main(["fit", *folder_args(tmp_path / "absent")])
    assert isinstance(info.value, DataError) or isinstance(info.value.__cause__ or info.value.__context__, DataError)


def test_the_installed_command_prints_one_line_and_exits_2(convmixer, tmp_path):
    result = convmixer("fit", *folder_args(tmp_path / "absent"), cwd=tmp_path)
    assert result.returncode == 2
    error_line(result.returncode, result.stderr, f"data.root {tmp_path / 'absent'} does not exist")


def test_reliability_doc_lists_every_test():
    """docs/reliability.md names one test per row: exactly the tests of this file (E), test_reliability.py (R) and
    test_run_folders.py (F), and tests that exist of test_plots.py (P), test_report.py (T) and test_predict.py (D)."""
    here = Path(__file__).parent
    files = {"E": "test_errors.py", "R": "test_reliability.py", "F": "test_run_folders.py", "P": "test_plots.py",
             "T": "test_report.py", "D": "test_predict.py"}
    defined = {(letter, node.name) for letter, name in files.items()
               for node in ast.parse((here / name).read_text()).body
               if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}
    listed = re.findall(r"^\|.*\| ([REFPTD]) `(test_\w+)` \|$", (here.parent / "docs" / "reliability.md").read_text(),
                        flags=re.MULTILINE)
    assert len(listed) == len(set(listed)) and set(listed) <= defined, set(listed) - defined
    whole = {(letter, name) for letter, name in defined if letter in "ERF"}
    assert {(letter, name) for letter, name in listed if letter in "ERF"} == whole, whole ^ set(listed)
