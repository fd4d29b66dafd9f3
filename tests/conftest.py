"""Shared fixtures: small data sets in their real on-disk formats, the real CIFAR-10 JPEGs where they are, and
runners for the `convmixer` command (installed, and in this process)."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import convmixer_pl

REPO = Path(convmixer_pl.__file__).resolve().parents[1]
# every run of the tests trains with the default speed settings: a measurement on a busy machine may choose
# differently between two runs that a test compares bit for bit (tests/test_speed*.py measure on purpose)
os.environ.setdefault("CONVMIXER_SPEED", "default")
CONFIGS = REPO / "configs"

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar_images(rng: np.random.Generator, labels: list[int]) -> np.ndarray:
    """Random uint8 images as CIFAR stores them: one row per image, the R, G and B 32x32 planes in turn."""
    return rng.integers(0, 256, size=(len(labels), 3 * 32 * 32), dtype=np.uint8)


def _pickle(path: Path, entry: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def write_cifar(root: Path, dataset: str = "cifar10", per_class: int = 2, seed: int = 0) -> Path:
    """Write a small CIFAR-10 (`cifar-10-batches-py/`) or CIFAR-100 (`cifar-100-python/`) under `root`.

    Same files, pickle keys and array layout as the released archives (which torchvision reads); `per_class`
    images of every class in each training file, and in the test file. Returns the data set's folder.
    """
    rng = np.random.default_rng(seed)
    if dataset == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        labels = [c for c in range(10) for _ in range(per_class)]
        for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
            batch_label = "testing batch 1 of 1" if name == "test_batch" else f"training batch {i + 1} of 5"
            _pickle(folder / name, {"batch_label": batch_label, "labels": list(labels),
                                    "data": _cifar_images(rng, labels),
                                    "filenames": [f"{name}_{j:05d}.png" for j in range(len(labels))]})
        _pickle(folder / "batches.meta", {"num_cases_per_batch": len(labels), "label_names": CIFAR10_CLASSES,
                                          "num_vis": 3072})
    elif dataset == "cifar100":
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        fine = [c for c in range(100) for _ in range(per_class)]
        for name in ("train", "test"):
            _pickle(folder / name, {"filenames": [f"{name}_{j:05d}.png" for j in range(len(fine))],
                                    "batch_label": f"{name}ing batch 1 of 1", "fine_labels": list(fine),
                                    "coarse_labels": [c // 5 for c in fine], "data": _cifar_images(rng, fine)})
        _pickle(folder / "meta", {"fine_label_names": [f"fine_{c:02d}" for c in range(100)],
                                  "coarse_label_names": [f"coarse_{c:02d}" for c in range(20)]})
    else:
        raise ValueError(dataset)
    return folder


def timm_to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (timm's) keys -> the official release's flat nn.Sequential keys: writes files in that layout."""
    depth = 1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")), default=-1)
    out = {}
    for key, value in state_dict.items():
        part, rest = key.split(".", 1)
        if part == "stem":
            out[rest] = value  # stem.0.* -> 0.*, stem.2.* -> 2.*
        elif part == "blocks":
            i, rest = rest.split(".", 1)
            out[f"{int(i) + 3}.{rest}"] = value
        else:
            out[f"{depth + 5}.{rest}"] = value
    return out


@pytest.fixture
def one_thread():
    """Tiny tensors in this process: one intra-op thread is fastest, and much faster on a busy machine. Not for
    tests that compare against `convmixer` subprocesses bit for bit: those run with the machine's thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    """A folder holding a tiny CIFAR-10 (100 train / 20 test images) and CIFAR-100 (200 / 200). Don't modify it."""
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root, "cifar10", per_class=2, seed=0)
    write_cifar(root, "cifar100", per_class=2, seed=1)
    return root


# (width, height, format, mode): PNG and JPEG, RGB and grayscale, portrait, landscape, odd sizes
IMAGE_FILES = [(40, 30, "png", "RGB"), (23, 57, "jpg", "RGB"), (64, 64, "png", "L"), (31, 33, "jpeg", "RGB")]


def write_image_folder(root: Path, classes=("cat", "dog", "owl"), splits=("train", "val", "test"),
                       files=IMAGE_FILES, seed: int = 0) -> Path:
    """Write `root/<split>/<class>/<image>` with one image per entry of `files`; each class has its own colour."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, (width, height, fmt, mode) in enumerate(files):
                colour = np.array([60 * c % 256, 255 - 70 * c % 256, 40 + 90 * c % 256])
                pixels = np.clip(colour + rng.integers(-30, 30, size=(height, width, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, "RGB").convert(mode).save(folder / f"{split}_{name}_{i}.{fmt}")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """`root/{train,val,test}/{cat,dog,owl}/` with 4 PNG/JPEG images of different sizes each. Don't modify it."""
    return write_image_folder(tmp_path_factory.mktemp("images") / "images")


def cifar10_jpg_archive() -> Path | None:
    """Where the real CIFAR-10 JPEGs are (a .tar.gz of train/<class>/*.jpg, test/<class>/*.jpg):
    CONVMIXER_CIFAR10_JPG. Never copied into the repository."""
    return Path(os.environ["CONVMIXER_CIFAR10_JPG"]) if os.environ.get("CONVMIXER_CIFAR10_JPG") else None


CIFAR10_JPG_TRAIN_PER_CLASS = 30


@pytest.fixture(scope="session")
def cifar10_jpg(tmp_path_factory) -> Path:
    """The real CIFAR-10 JPEGs, extracted once per session: all 10,000 of test/ and the first 30 of each class of
    train/ in the archive (4 s on two cores; all 60,000 take 15 s). Skips where the archive is absent. Don't modify
    it."""
    archive = cifar10_jpg_archive()
    if archive is None or not archive.is_file():
        pytest.skip(f"the real CIFAR-10 JPEGs are not at CONVMIXER_CIFAR10_JPG={archive} (set it to the .tar.gz)")
    root = tmp_path_factory.mktemp("cifar10-jpg")
    taken: Counter = Counter()
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.10.12: no paths outside root
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = member.name.removeprefix("./").split("/")
            if not member.isfile() or parts[0] not in ("train", "test"):
                continue
            if parts[0] == "train":
                taken[parts[1]] += 1
                if taken[parts[1]] > CIFAR10_JPG_TRAIN_PER_CLASS:
                    continue
            tar.extract(member, root, **safe)
    return root


def convmixer_command() -> str:
    """The installed `convmixer` script: beside the running interpreter (a virtual environment's bin/, which need
    not be activated), else on PATH."""
    beside = Path(sys.executable).parent / ("convmixer.exe" if os.name == "nt" else "convmixer")
    command = str(beside) if beside.is_file() else shutil.which("convmixer")
    assert command is not None, "the `convmixer` console script is not installed (pip install -e .)"
    return command


def run_convmixer(*args: str, cwd: Path, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed `convmixer` command; wide output so Lightning's metric tables keep whole numbers.

    One intra-op thread: the test models are tiny, and on a busy 2-core machine a second OpenMP thread mostly
    spins (twice the CPU time, slower runs). Pass env={"OMP_NUM_THREADS": ...} to change it.
    """
    command = convmixer_command()
    full_env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("CONVMIXER_DEBUG", None)
    return subprocess.run([command, *map(str, args)], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def convmixer():
    """The `run_convmixer(*args, cwd=...)` runner, for tests that drive the command end to end."""
    return run_convmixer


def run_main(capsys, *args) -> tuple[int, str]:
    """`convmixer ARGS` in this process (the console script's own entry point, without a subprocess's seconds):
    the exit code (0 when it returned) and stderr."""
    from convmixer_pl.cli import main

    try:
        main([str(arg) for arg in args])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def folder_args(root: Path, *extra: str) -> list[str]:
    """An image folder at 16 px and a tiny ConvMixer, loading in this process, quietly."""
    return ["--data", "ImageFolderDataModule", "--data.root", str(root), "--data.image_size", "16",
            "--data.batch_size", "4", "--data.num_workers", "0", "--data.pin_memory", "false",
            "--data.persistent_workers", "false", "--model.dim", "8", "--model.depth", "1", "--model.kernel_size", "3",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--plots.enabled", "false", *map(str, extra)]


# a tiny ConvMixer on 8 px digits: fast to train, test, predict with and export
TINY_DIGITS = ["--config", str(CONFIGS / "digits.yaml"), "--model.dim", "16", "--model.depth", "2",
               "--model.kernel_size", "3", "--data.image_size", "8", "--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """`convmixer fit` (2 short epochs) then `convmixer test` of TINY_DIGITS, run in-process into one folder:
    last.ckpt, lightning_logs/version_0 (the fit: metrics.csv, plots/) and version_1 (the test: report/).
    Don't modify it: pass --trainer.default_root_dir / --predictions.output elsewhere when using it."""
    from convmixer_pl.cli import ConvMixerCLI

    run = tmp_path_factory.mktemp("digits_run")
    where = ["--checkpoint.dirpath", str(run)]
    ConvMixerCLI(args=["fit", *TINY_DIGITS, *where, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "6"])
    ConvMixerCLI(args=["test", *TINY_DIGITS, *where])
    return run
