"""`benchmarks.gpu_check --cpu_tiny true` and `benchmarks.official` (our side; the official script's
where $CONVMIXER_OFFICIAL_REPO names a clone of it) on a tiny CIFAR-10 in the real tarball's format, and the
patching of the official script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import CIFAR10_CLASSES, REPO
from PIL import Image

from benchmarks import official

GPU_CHECK_PARTS = {"epoch_bf16_channels_last", "epoch_device_pipeline", "epoch_channels_last_off", "epoch_compile",
                   "epoch_16_mixed", "official_script", "official_benchmark", "big_model_checkpointing", "fsdp",
                   "recipe_25ep"}
HAS_CLONE = bool(os.environ.get(official.ENV_REPO))


def write_cifar_jpg_tarball(path: Path, train_per_class: int = 16, test_per_class: int = 4, seed: int = 0) -> Path:
    """A tar.gz of 32x32 JPEGs as the CIFAR-10 JPEG tarball lays them out: train/<class>/NNNN.jpg and
    test/<class>/NNNN.jpg for the ten CIFAR-10 classes, each class with its own colour."""
    rng = np.random.default_rng(seed)
    folder = path.parent / "cifar10-jpg"
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for c, name in enumerate(CIFAR10_CLASSES):
            (folder / split / name).mkdir(parents=True, exist_ok=True)
            colour = np.array([25 * c, 255 - 25 * c, (90 * c) % 256])
            for i in range(n):
                pixels = np.clip(colour + rng.integers(-40, 40, size=(32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, "RGB").save(folder / split / name / f"{i:04d}.jpg", quality=90)
    with tarfile.open(path, "w:gz") as archive:
        for split in ("train", "test"):
            archive.add(folder / split, arcname=split)
    return path


@pytest.fixture(scope="module")
def tiny_tarball(tmp_path_factory) -> Path:
    """160 training and 40 test images. Don't modify it."""
    return write_cifar_jpg_tarball(tmp_path_factory.mktemp("cifar10_jpg") / "cifar10-jpg.tar.gz")


def run_module(name: str, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *map(str, args)], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=600)


def numbers(value) -> list[float]:
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in numbers(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def test_gpu_check_cpu_tiny_reports_every_part(tiny_tarball, tmp_path):
    out = tmp_path / "out"
    proc = run_module("gpu_check", "--tarball", tiny_tarball, "--out", out, "--cpu_tiny", "true", "--work_dir",
                      tmp_path / "work")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list(out.iterdir()) == [out / "gpu_check.json"]  # one results file
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["mode"] == "cpu-tiny" and set(result["parts"]) == GPU_CHECK_PARTS
    parts = result["parts"]
    for name, entry in parts.items():
        assert entry["status"] in ("ok", "skipped"), (name, entry.get("reason"), entry.get("log_tail"))
        if entry["status"] == "ok":
            assert numbers({k: v for k, v in entry.items() if k not in ("budget_s", "seconds")}), (name, entry)
        else:
            assert entry["reason"].startswith("skipped"), (name, entry)
        assert f"| {name} | {entry['status']} |" in proc.stdout  # the markdown table: a row for every part
    assert parts["epoch_16_mixed"]["reason"] == parts["fsdp"]["reason"] == "skipped: needs a CUDA GPU"
    base = parts["epoch_bf16_channels_last"]
    assert base["status"] == "ok" and base["images_per_sec"] > 0 and base["epoch_time_s"] > 0
    assert parts["epoch_device_pipeline"]["status"] == "ok"
    big = parts["big_model_checkpointing"]
    assert all(big[f"{r} checkpointing {c} images_per_sec"] > 0 for r in ("lightning", "plain") for c in ("on", "off"))
    assert parts["official_benchmark"]["official checkpointing off images_per_sec"] > 0
    assert parts["recipe_25ep"]["status"] == "ok" and parts["recipe_25ep"]["epochs_validated"] == 1
    if HAS_CLONE:
        assert parts["official_script"]["status"] == "ok" and parts["official_script"]["images_per_sec"] > 0
    else:
        assert parts["official_script"]["reason"] == f"skipped: {official.NOT_FOUND}"


def test_side_by_side_tiny(tiny_tarball, tmp_path):
    """Our side always; the official script's beside it where a clone of it is named."""
    output = tmp_path / "results.json"
    proc = run_module("official", "--tarball", tiny_tarball, "--runners",
                      "official,ours" if HAS_CLONE else "ours", "--recipe.hdim", 16, "--recipe.depth", 2,
                      "--recipe.conv_ks", 3, "--recipe.batch_size", 32, "--recipe.epochs", 1, "--recipe.workers", 0,
                      "--train_subset", 64, "--work_dir", tmp_path / "work", "--output", output)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "warning: epochs 1 is not a multiple of 5" in proc.stdout
    result = json.loads(output.read_text())
    assert result["train_images"] == 64
    (ours,) = result["runs"]["ours"]
    assert ours["error"] is None and ours["wall_s"] > 0
    assert ours["train_images_per_sec"] > 0 and 0 <= ours["final_test_acc"] <= 1
    assert "--data.augment.ra_num_ops" in ours["command"] and "--model.opt_eps" in ours["command"]
    assert result["summary"]["ours"]["final_test_acc"]["n"] == 1
    if HAS_CLONE:
        (theirs,) = result["runs"]["official"]
        assert theirs["error"] is None and theirs["train_images_per_sec"] > 0
        assert [e["train_images"] for e in theirs["epochs"]] == [64]  # the same subset
        assert result["ratios"]["wall_official_over_ours"] > 0


def test_side_by_side_without_a_clone_or_images_says_how_to_give_them(tiny_tarball, tmp_path):
    env = {official.ENV_REPO: "", official.ENV_DATA: ""}
    proc = run_module("official", "--tarball", tiny_tarball, "--work_dir", tmp_path, env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1].endswith(official.NOT_FOUND)
    proc = run_module("official", "--runners", "ours", "--work_dir", tmp_path, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "no CIFAR-10 JPEG tarball: pass --tarball FILE or --data_root DIR, or set CONVMIXER_CIFAR10_JPG")


def test_official_source_comes_from_a_clone(tmp_path, monkeypatch):
    monkeypatch.delenv(official.ENV_REPO, raising=False)
    with pytest.raises(official.OfficialNotFound, match=f"^{official.NOT_FOUND}$"):
        official.official_source()
    with pytest.raises(official.OfficialNotFound, match=r"\(.*/train.py is not a file\)$"):
        official.official_source(tmp_path)
    (tmp_path / "train.py").write_text("print('the official script')\n")
    monkeypatch.setenv(official.ENV_REPO, str(tmp_path))
    assert official.official_source() == ("print('the official script')\n", str(tmp_path / "train.py"))


def test_patches_fail_loudly_on_a_changed_script():
    source = "import argparse\nparser.add_argument('--workers', default=2, type=int)\n"
    with pytest.raises(official.PatchError, match="patch 'seed'"):
        official.patch_source(source, "cpu")


@pytest.mark.skipif(not HAS_CLONE, reason=f"{official.ENV_REPO} names no clone of the official repository")
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_every_patch_applies_to_the_official_script(device):
    source, _ = official.official_source()
    patched = official.patch_source(source, device)
    compile(patched, "train_patched.py", "exec")
    assert "torchvision.datasets.CIFAR10" not in patched and ".cuda()" not in patched
    assert ("nn.DataParallel" in patched) == (device == "cuda")
    assert ("torch.cuda.amp.autocast()" in patched) == (device == "cuda")


def test_parse_epochs_reads_the_script_lines():
    text = ("[ConvMixer] Epoch: 0 | Train Acc: 0.3000, Test Acc: 0.4000, Time: 12.5, lr: 0.005000\n"
            "[ConvMixer] Epoch: 0 | Train Time: 10.000, Train Images: 5000\n"
            "[ConvMixer] Epoch: 1 | Train Acc: 0.5000, Test Acc: 0.6000, Time: 11.0, lr: 0.000000\n"
            "[ConvMixer] Epoch: 1 | Train Time: 8.000, Train Images: 5000\n")
    run = official.Run("official", 0, [], "log").summarise(official.parse_epochs(text))
    assert [e["test_acc"] for e in run.epochs] == [0.4, 0.6] and [e["time_s"] for e in run.epochs] == [12.5, 11.0]
    assert run.train_images_per_sec == 625.0  # the epochs after the first: 5000 / 8
    assert run.final_test_acc == 0.6
