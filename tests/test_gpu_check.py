"""benchmarks/gpu_check.py --cpu-tiny and benchmarks/cifar10_side_by_side.py (our side; the official script's
too where it can be found) on a tiny CIFAR-10 in the real tarball's format: train/<class>/*.jpg and
test/<class>/*.jpg, packed as .tar.gz."""

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

BENCHMARKS = REPO / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the scripts import each other as top-level modules

import official  # noqa: E402

GPU_CHECK_PARTS = {"epoch_bf16_channels_last", "epoch_gpu_pipeline", "epoch_channels_last_off", "epoch_compile",
                   "epoch_16_mixed", "official_script", "official_benchmark", "big_model_checkpointing", "fsdp",
                   "recipe_25ep"}


def write_cifar_jpg_tarball(path: Path, train_per_class: int = 16, test_per_class: int = 4, seed: int = 0) -> Path:
    """A tar.gz of 32x32 JPEGs laid out as shared/data/cifar10-jpg.tar.gz: train/<class>/NNNN.jpg and
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


def official_available() -> bool:
    try:
        official.find_official_script()
    except official.OfficialScriptNotFound:
        return False
    return True


def run_script(script: str, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=600)


def has_number(entry: dict) -> bool:
    def numbers(value):
        if isinstance(value, bool):
            return
        if isinstance(value, (int, float)):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from numbers(v)
        elif isinstance(value, list):
            for v in value:
                yield from numbers(v)

    skip = {"budget_s", "seconds"}  # the driver's own, present for every part
    return any(True for key, value in entry.items() if key not in skip for _ in numbers(value))


def test_gpu_check_cpu_tiny_reports_every_part(tiny_tarball, tmp_path):
    out = tmp_path / "out"
    proc = run_script("gpu_check.py", "--tarball", tiny_tarball, "--out", out, "--cpu-tiny", "--work-dir",
                      tmp_path / "work", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(out.iterdir())
    assert files == [out / "gpu_check.json"]  # one results file
    result = json.loads(files[0].read_text())
    assert result["mode"] == "cpu-tiny"
    assert set(result["parts"]) == GPU_CHECK_PARTS
    for name, entry in result["parts"].items():
        assert entry["status"] in ("ok", "skipped"), (name, entry.get("reason"), entry.get("log_tail"))
        if entry["status"] == "ok":
            assert has_number(entry), (name, entry)
        else:
            assert entry["reason"].startswith("skipped"), (name, entry)
    parts = result["parts"]
    for name in ("epoch_16_mixed", "fsdp"):
        assert parts[name]["reason"] == "skipped: needs a CUDA GPU"
    base = parts["epoch_bf16_channels_last"]
    assert base["status"] == "ok" and base["images_per_sec"] > 0 and base["epoch_time_s"] > 0
    big = parts["big_model_checkpointing"]
    assert big["status"] == "ok" and big["plain_checkpointing_on"]["train_step_s"] > 0
    assert big["plain_checkpointing_off"]["train_step_s"] > 0
    assert parts["official_benchmark"]["runners"]["official"]["train_images_per_sec"] > 0
    assert parts["recipe_25ep"]["status"] == "ok" and parts["recipe_25ep"]["epochs_validated"] == 1
    if official_available():
        assert parts["official_script"]["status"] == "ok" and parts["official_script"]["images_per_sec"] > 0
    else:
        assert parts["official_script"]["reason"] == f"skipped: {official.NOT_FOUND}"
    # the markdown table: a row for every part
    for name in GPU_CHECK_PARTS:
        assert f"| {name} |" in proc.stdout


def test_side_by_side_tiny(tiny_tarball, tmp_path):
    """Our side always; the official script's where the mirror or $CONVMIXER_OFFICIAL_SCRIPT has it, else its
    skip reason."""
    output = tmp_path / "results.json"
    proc = run_script("cifar10_side_by_side.py", "--tarball", tiny_tarball, "--dim", "16", "--depth", "2",
                      "--kernel", "3", "--batch-size", "32", "--epochs", "1", "--workers", "0", "--train-subset",
                      "64", "--seeds", "0", "--work-dir", tmp_path / "work", "--output", output, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "warning: --epochs 1 is not a multiple of 5" in proc.stdout
    result = json.loads(output.read_text())
    assert result["train_images"] == 64
    (ours,) = result["ours"]
    assert ours["error"] is None and ours["wall_s"] > 0
    assert ours["train_images_per_sec"] > 0 and 0 <= ours["final_test_acc"] <= 1
    assert "--data.augment.ra_num_ops" in ours["command"] and "--model.opt_eps" in ours["command"]
    assert result["summary"]["ours"]["final_test_acc"]["n"] == 1
    if official_available():
        (theirs,) = result["official"]
        assert theirs["error"] is None and theirs["train_images_per_sec"] > 0
        assert [e["train_images"] for e in theirs["epochs"]] == [64]  # the same subset
        assert result["ratios"]["wall_official_over_ours"] > 0
        assert "images_per_sec_ours_over_official" in result["ratios"]
    else:
        assert result["skipped"]["official"] == official.NOT_FOUND
        assert "| official | skipped: official train.py not found: set CONVMIXER_OFFICIAL_SCRIPT |" in proc.stdout


def test_side_by_side_skips_the_official_script_it_cannot_find(tiny_tarball, tmp_path):
    env = {"CONVMIXER_OFFICIAL_MIRROR": str(tmp_path / "no-mirror"), official.ENV_SCRIPT: ""}
    proc = run_script("cifar10_side_by_side.py", "--tarball", tiny_tarball, "--runners", "official", "--epochs", "5",
                      "--work-dir", tmp_path / "work", "--output", tmp_path / "results.json", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "warning" not in proc.stdout  # 5 epochs: the two schedules agree
    assert "| official | skipped: official train.py not found: set CONVMIXER_OFFICIAL_SCRIPT |" in proc.stdout
    assert json.loads((tmp_path / "results.json").read_text())["skipped"] == {"official": official.NOT_FOUND}


def test_official_script_not_found_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.delenv(official.ENV_SCRIPT, raising=False)
    with pytest.raises(official.OfficialScriptNotFound, match="^official train.py not found: set "
                                                              "CONVMIXER_OFFICIAL_SCRIPT$"):
        official.find_official_script(mirror=tmp_path / "no-mirror")


def test_patches_fail_loudly_on_a_changed_script():
    source = "import argparse\nparser.add_argument('--workers', default=2, type=int)\n"
    with pytest.raises(official.PatchError, match="patch 'seed'"):
        official.patch_source(source, "cpu")


@pytest.mark.skipif(not official_available(), reason=official.NOT_FOUND)
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_every_patch_applies_to_the_official_script(device):
    source, _ = official.find_official_script()
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
    run = official.summarise(official.OfficialRun("cpu", 0, {}, "."), text)
    assert [e["test_acc"] for e in run.epochs] == [0.4, 0.6]
    assert run.train_images_per_sec == 625.0  # the epochs after the first: 5000 / 8
    assert run.final_test_acc == 0.6 and run.epoch_times_s == [12.5, 11.0]
