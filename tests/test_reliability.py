"""Exact resume, crash safety (kill -9, SIGTERM, SIGINT) and the non-finite-loss stop; see docs/reliability.md.

One uninterrupted reference run (in-process, module-scoped) keeps a checkpoint after every training step and at
every validation; each resume test restarts from one of them, or from a real process that was killed or
signalled, and must end with the reference's weights and logged metrics. The data are real PNG files with
random augmentation (random resized crops, flips, MixUp), so the RNG states matter.
"""

from __future__ import annotations

import csv
import errno
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONFIGS, convmixer_command
from lightning.pytorch.callbacks import Callback
from PIL import Image
from sklearn.datasets import load_digits

from convmixer_pl.callbacks.guards import NonFiniteLoss, StopGuard
from convmixer_pl.checkpoints import TMP_SUFFIX, AtomicCheckpointIO, read_checkpoint
from convmixer_pl.cli import ConvMixerCLI, main
from convmixer_pl.data import ImageFolderDataModule
from convmixer_pl.data.base import TensorImageDataset
from convmixer_pl.files import TMP_SUFFIX as OUTPUT_TMP_SUFFIX
from convmixer_pl.files import OutputError, atomic_write
from convmixer_pl.resume import EpochSampler, SeededItems

STEPS_PER_EPOCH, EPOCHS = 10, 3  # 120 training images, batches of 12


def write_digit_folder(root: Path) -> Path:
    """scikit-learn's digits as 16 px PNGs in `root/{train,val,test}/<digit>/`: 120 / 30 / 30 images."""
    digits = load_digits()
    for split, (start, stop) in {"train": (0, 120), "val": (120, 150), "test": (150, 180)}.items():
        for i in range(start, stop):
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
            Image.fromarray(pixels).resize((16, 16)).convert("RGB").save(folder / f"{i}.png")
    return root


def fit_args(data: Path, dirpath: Path, *extra: str, workers: int = 0) -> list[str]:
    return ["fit", "--seed_everything", "0", "--data", "ImageFolderDataModule", "--data.root", str(data),
            "--data.image_size", "16", "--data.crop_pct", "1.0", "--data.batch_size", "12",
            "--data.num_workers", str(workers), "--data.pin_memory", "false",
            "--data.persistent_workers", str(workers > 0).lower(), "--data.augment.mixup_alpha", "0.2",
            "--model.dim", "16", "--model.depth", "1", "--model.kernel_size", "3", "--model.patch_size", "2",
            "--trainer.max_epochs", str(EPOCHS), "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--plots.enabled", "false", "--checkpoint.dirpath", str(dirpath), *extra]


def weights(cli: ConvMixerCLI) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in cli.model.state_dict().items()}


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)


def logged(dirpath: Path) -> dict[tuple[int, str], float]:
    """Every value in the run's metrics.csv by (step, name), except wall-clock throughput."""
    (path,) = dirpath.glob("lightning_logs/version_*/metrics.csv")
    with open(path) as f:
        return {(int(row["step"]), name): float(value) for row in csv.DictReader(f)
                for name, value in row.items() if value and name != "step" and "per_sec" not in name}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_digit_folder(tmp_path_factory.mktemp("digit_pngs"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run: step checkpoints in steps/, one per validation (epochNNN.ckpt) beside them."""
    run = tmp_path_factory.mktemp("reference")
    cli = ConvMixerCLI(args=fit_args(
        data, run, "--checkpoint.save_top_k", "-1",
        "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath", str(run / "steps"),
        "--trainer.callbacks.every_n_train_steps", "1", "--trainer.callbacks.save_top_k", "-1",
        "--trainer.callbacks.filename", "step{step:03d}", "--trainer.callbacks.auto_insert_metric_name", "false"))
    assert cli.trainer.global_step == STEPS_PER_EPOCH * EPOCHS
    return {"dir": run, "weights": weights(cli), "logged": logged(run)}


def resume(data: Path, checkpoint: Path, dirpath: Path, *extra: str, workers: int = 0) -> ConvMixerCLI:
    """`fit --ckpt_path last` in a folder whose last.ckpt is `checkpoint` (unless it is already there)."""
    dirpath.mkdir(parents=True, exist_ok=True)
    if checkpoint != dirpath / "last.ckpt":
        shutil.copy(checkpoint, dirpath / "last.ckpt")
    return ConvMixerCLI(args=fit_args(data, dirpath, "--ckpt_path", "last", *extra, workers=workers))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("name, where", [
    ("steps/step015.ckpt", "mid-epoch, after a training step"),
    ("steps/step020.ckpt", "after the last step of an epoch"),
    ("epoch000.ckpt", "after an epoch's validation"),
])
def test_resume_matches_the_uninterrupted_run(data, reference, tmp_path, name, where, workers):
    """The reference trains with 0 loader workers; resuming with 2 (persistent) workers ends the same: each
    image's augmentation depends on (seed, epoch, image) only, and the position is a batch count."""
    start = read_checkpoint(reference["dir"] / name)["global_step"]
    resumed = resume(data, reference["dir"] / name, tmp_path / "resumed", workers=workers)
    assert resumed.trainer.global_step == STEPS_PER_EPOCH * EPOCHS
    assert_same_weights(weights(resumed), reference["weights"])
    after = logged(tmp_path / "resumed")
    assert after and min(step for step, _ in after) >= start  # it logged only what came after the checkpoint
    assert {name for _, name in after} >= {"train/loss_step", "train/loss_epoch", "train/acc1", "val/acc1"}
    for key, value in after.items():
        assert value == pytest.approx(reference["logged"][key], rel=1e-6, abs=1e-7), (where, key)


def test_device_pipeline_resumes_mid_epoch_exactly(cifar_root, tmp_path):
    """CIFAR's device-resident loader (run on the CPU device here) resumes at the same batch with the same draws."""
    def fit(dirpath: Path, *extra: str) -> ConvMixerCLI:
        return ConvMixerCLI(args=[
            "fit", "--seed_everything", "0", "--data", "CIFARDataModule", "--data.root", str(cifar_root),
            "--data.verify_checksums", "false", "--data.val_fraction", "0.2", "--data.batch_size", "16",
            "--data.device_pipeline", "true", "--data.augment.ra_num_ops", "0", "--data.augment.color_jitter", "0",
            "--data.augment.mixup_alpha", "0.2", "--model.dim", "8", "--model.depth", "1", "--model.kernel_size", "3",
            "--model.patch_size", "4", "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--plots.enabled", "false",
            "--checkpoint.dirpath", str(dirpath), *extra])

    steps = fit(tmp_path / "steps", "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath",
                str(tmp_path / "steps"), "--trainer.callbacks.every_n_train_steps", "1",
                "--trainer.callbacks.save_top_k", "-1", "--trainer.callbacks.filename", "step{step:03d}",
                "--trainer.callbacks.auto_insert_metric_name", "false")
    assert steps.trainer.global_step == 10  # 80 training images, batches of 16, 2 epochs
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "steps" / "step007.ckpt", tmp_path / "resumed" / "last.ckpt")  # epoch 1, batch 2 of 5
    resumed = fit(tmp_path / "resumed", "--ckpt_path", "last")
    assert resumed.trainer.global_step == 10
    assert_same_weights(weights(resumed), weights(steps))


def start_fit(data: Path, dirpath: Path, log: Path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "CONVMIXER_DEBUG"}
    return subprocess.Popen([sys.executable, "-m", "convmixer_pl.cli", *fit_args(data, dirpath, *extra)],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the run ended (code {process.returncode}) before writing {path}"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.005)


def test_kill_9_leaves_a_loadable_last_ckpt_and_resuming_loses_nothing(data, reference, tmp_path):
    run, every = tmp_path / "run", 2
    process = start_fit(data, run, tmp_path / "log.txt", "--checkpoint.last_every_n_steps", str(every))
    try:
        wait_for(run / "last.ckpt", process)
        time.sleep(random.uniform(0.0, 0.3))  # any moment, a save in progress included
        assert process.poll() is None, "the run finished before it could be killed"
        process.send_signal(signal.SIGKILL)
        assert process.wait(60) == -signal.SIGKILL
    finally:
        process.kill()
    saved = read_checkpoint(run / "last.ckpt")  # loadable, whatever the moment of the kill
    assert 0 < saved["global_step"] < STEPS_PER_EPOCH * EPOCHS
    assert saved["global_step"] % every == 0  # a step save or an epoch end (both even): at most `every` - 1 lost
    resumed = resume(data, run / "last.ckpt", run, "--checkpoint.last_every_n_steps", str(every))
    assert_same_weights(weights(resumed), reference["weights"])
    assert not list(run.glob(f"*{TMP_SUFFIX}"))  # a half-written temporary of the killed run is cleaned up


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_process_group_with_loader_workers_saves_and_resumes_exactly(data, reference, tmp_path,
                                                                                      signum):
    """As `timeout`, SLURM, systemd and Ctrl+C send it: to every process of the group, the loader workers too."""
    run, log = tmp_path / "run", tmp_path / "log.txt"
    env = {**{k: v for k, v in os.environ.items() if k != "CONVMIXER_DEBUG"}, "COLUMNS": "200"}
    with open(log, "w") as stderr:
        process = subprocess.Popen([convmixer_command(), *fit_args(data, run, "--checkpoint.last_every_n_steps", "2",
                                                                   workers=2)],
                                   stdout=subprocess.DEVNULL, stderr=stderr, env=env, start_new_session=True)
    try:
        wait_for(run / "last.ckpt", process)  # training has begun: the two workers are running
        assert process.poll() is None, "the run finished before it could be signalled"
        os.killpg(process.pid, signum)
        code = process.wait(120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    stderr = log.read_text()
    assert code == 128 + signum, stderr[-3000:]
    stopped = re.search(rf"convmixer: stopped by {signal.Signals(signum).name} after step (\d+); saved (\S+)\.", stderr)
    assert stopped and "Traceback" not in stderr, stderr[-3000:]
    saved = read_checkpoint(run / "last.ckpt")
    assert saved["global_step"] == int(stopped[1]) < STEPS_PER_EPOCH * EPOCHS
    resumed = resume(data, run / "last.ckpt", run, workers=2)
    assert_same_weights(weights(resumed), reference["weights"])


def signal_when_training(signum: int, checkpoint: Path) -> threading.Thread:
    """Send `signum` to this process once `checkpoint` exists, while the run's handler is the one in place."""
    def send() -> None:
        deadline = time.monotonic() + 240
        while not checkpoint.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        if getattr(signal.getsignal(signum), "__func__", None) is StopGuard._on_signal:
            os.kill(os.getpid(), signum)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_save_a_checkpoint_then_exit(data, reference, tmp_path, capsys, signum):
    run = tmp_path / "run"
    sender = signal_when_training(signum, run / "last.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(data, run, "--checkpoint.last_every_n_steps", "3"))
    sender.join()
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 128 + signum, stderr[-3000:]
    name = signal.Signals(signum).name
    stopped = re.search(rf"convmixer: stopped by {name} after step (\d+); saved (\S+)\.", stderr)
    assert stopped and "Traceback" not in stderr, stderr[-3000:]
    assert Path(stopped[2]) == run / "last.ckpt"
    saved = read_checkpoint(run / "last.ckpt")
    assert saved["global_step"] == int(stopped[1]) < STEPS_PER_EPOCH * EPOCHS  # saved where it stopped
    assert getattr(signal.getsignal(signum), "__func__", None) is not StopGuard._on_signal  # handler restored
    if signum == signal.SIGTERM:  # preemption: the same command with --ckpt_path last finishes the run exactly
        resumed = resume(data, run / "last.ckpt", run)
        assert_same_weights(weights(resumed), reference["weights"])


class SignalDuringValidation(Callback):
    """Sends SIGTERM to this process after the first validation batch of the first epoch (not the sanity check)."""

    def __init__(self) -> None:
        self.sent = False

    def on_validation_batch_end(self, trainer, *args, **kwargs) -> None:
        if not trainer.sanity_checking and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


def logged_in_all_versions(dirpath: Path) -> dict[tuple[int, str], float]:
    """`logged`, over every metrics.csv of the folder (an interrupted run's and its resumed run's)."""
    values: dict[tuple[int, str], float] = {}
    for path in sorted(dirpath.glob("lightning_logs/version_*/metrics.csv")):
        with open(path) as f:
            values.update({(int(row["step"]), name): float(value) for row in csv.DictReader(f)
                           for name, value in row.items() if value and name != "step" and "per_sec" not in name})
    return values


def test_sigterm_during_validation_keeps_the_epochs_training_metrics(data, reference, tmp_path, capsys):
    """Lightning logs an epoch's training metrics after the `on_train_epoch_end` hooks: the stop waits for them."""
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(data, run, f"--trainer.callbacks+={__name__}.SignalDuringValidation"))
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 143, stderr[-3000:]
    assert f"stopped by SIGTERM after step {STEPS_PER_EPOCH}; saved {run / 'last.ckpt'}." in stderr
    assert read_checkpoint(run / "last.ckpt")["global_step"] == STEPS_PER_EPOCH
    stopped = logged_in_all_versions(run)
    epoch_end = {name for step, name in stopped if step == STEPS_PER_EPOCH - 1}
    assert {"train/loss_epoch", "train/acc1", "val/acc1", "val/loss"} <= epoch_end, epoch_end
    resumed = resume(data, run / "last.ckpt", run)
    assert_same_weights(weights(resumed), reference["weights"])
    after = logged_in_all_versions(run)  # the stopped run's logs and the resumed run's: all of them, once
    assert after.keys() == reference["logged"].keys(), after.keys() ^ reference["logged"].keys()
    for key, value in after.items():
        assert value == pytest.approx(reference["logged"][key], rel=1e-6, abs=1e-7), key


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "digits.yaml"), "--model.dim", "16", "--model.depth", "1",
              "--model.lr", "1e30", "--model.scheduler", "constant",
              "--trainer.gradient_clip_val", "null", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar",
              "false", "--plots.enabled", "false", "--checkpoint.dirpath", str(run),
              "--checkpoint.last_every_n_steps", "1"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    stopped = re.search(r"convmixer: error: the training loss is (nan|inf|-inf) at step (\d+) \(epoch 0, batch \d+\)",
                        err)
    assert stopped and "Traceback" not in err, err[-3000:]
    assert f"the last checkpoint, {run / 'last.ckpt'}, is untouched" in err
    saved = read_checkpoint(run / "last.ckpt")
    assert saved["global_step"] == int(stopped[2]) - 1  # written by the step before, not after the bad one
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())
    assert sorted(p.name for p in run.glob("*.ckpt")) == ["last.ckpt"]  # no epoch-end save of broken weights


def test_step_saves_write_the_runs_last_ckpt_once_per_optimizer_step(tmp_path, monkeypatch):
    saved: list[tuple[Path, int]] = []
    write = AtomicCheckpointIO.save_checkpoint

    def record(self, checkpoint, path, storage_options=None):  # watches the real writer, which still writes
        saved.append((Path(path), checkpoint["global_step"]))
        return write(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", record)
    run, other = tmp_path / "run", tmp_path / "other"
    main(["fit", "--config", str(CONFIGS / "digits.yaml"), "--model.dim", "8", "--model.depth", "1",
          "--trainer.max_steps", "3", "--trainer.accumulate_grad_batches", "3", "--trainer.limit_val_batches", "0",
          "--trainer.enable_progress_bar", "false", "--plots.enabled", "false", "--checkpoint.dirpath", str(run),
          "--checkpoint.last_every_n_steps", "1",
          # a user's own ModelCheckpoint, which Lightning puts before the run's: the run's saves stay in run/
          "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath", str(other),
          "--trainer.callbacks.save_top_k", "0"])
    # steps 1-3 once each: not at step 0, not again for the other batches of an accumulation window; then step 3
    # once more at the epoch's end, with the finished epoch's loop state
    assert saved == [(run / "last.ckpt", step) for step in (1, 2, 3, 3)]
    assert not other.exists()


def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path):
    cli = ConvMixerCLI(args=["fit", "--config", str(CONFIGS / "digits.yaml"),
                             "--model.dim", "8", "--model.depth", "1", "--trainer.max_steps", "1",
                             "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
                             "--plots.enabled", "false", "--checkpoint.dirpath", str(tmp_path / "run")])
    with torch.no_grad():
        cli.model.model.head.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLoss, match=r"weights are not finite after step 1 \(model.head.weight\)"):
        cli.trainer.save_checkpoint(tmp_path / "broken.ckpt")
    assert not (tmp_path / "broken.ckpt").exists()


def test_atomic_writes_survive_kill_9_in_the_middle_of_a_save(tmp_path):
    """A writer saving a 32 MB checkpoint over and over is killed while its temporary file exists (mid-save)."""
    target = tmp_path / "last.ckpt"
    writer = ("import itertools, torch\nfrom convmixer_pl.checkpoints import AtomicCheckpointIO\n"
              "for i in itertools.count():\n"
              "    state = {'i': i, 'w': torch.full((2**23,), float(i))}\n"
              f"    AtomicCheckpointIO().save_checkpoint(state, {str(target)!r})\n")
    process = subprocess.Popen([sys.executable, "-c", writer])
    try:
        deadline = time.monotonic() + 240
        while not (target.exists() and list(tmp_path.glob(f".*{TMP_SUFFIX}"))):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.001)
        process.send_signal(signal.SIGKILL)
        assert process.wait(30) == -signal.SIGKILL
    finally:
        process.kill()
    state = torch.load(target, weights_only=True)  # the previous complete save, never a torn one
    assert torch.equal(state["w"], torch.full_like(state["w"], float(state["i"])))


def test_sampler_order_depends_on_seed_and_epoch_and_can_skip_part_of_an_epoch():
    dataset = list(range(50))
    first, again = (EpochSampler(dataset, num_replicas=1, rank=0, seed=3) for _ in range(2))
    assert list(first) == list(again) and sorted(i for _, i in first) == dataset
    assert {epoch for epoch, _ in first} == {0}
    first.set_epoch(1)
    assert [i for _, i in first] != [i for _, i in again] and {epoch for epoch, _ in first} == {1}
    order = list(again)
    again.load_state_dict({"yielded": 20})
    assert list(again) == order[20:] and len(again) == 50  # skips once; the epoch length stays whole
    assert list(again) == order
    shards = [[i for _, i in EpochSampler(dataset, num_replicas=2, rank=r, seed=3)] for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == dataset


def test_augmentation_depends_on_seed_epoch_and_image_only():
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    noisy = TensorImageDataset(images, torch.zeros(6), transform=lambda image: image.float() + torch.randn(3, 8, 8))
    seeded = SeededItems(noisy, seed=5)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = seeded[(2, 4)][0]
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random stream is left as it was
    torch.rand(7)  # whatever else draws in between, in this process or in a worker
    assert torch.equal(seeded[(2, 4)][0], a)
    assert not torch.equal(seeded[(3, 4)][0], a) and not torch.equal(seeded[(2, 5)][0] - images[5], a - images[4])
    assert not torch.equal(SeededItems(noisy, seed=6)[(2, 4)][0], a)


def test_data_module_position_round_trips_and_applies_only_to_its_epoch(data):
    """A position saved mid-epoch skips exactly the trained batches of that epoch; a finished epoch's is empty."""
    def module() -> ImageFolderDataModule:
        dm = ImageFolderDataModule(str(data), image_size=16, batch_size=12, num_workers=0, persistent_workers=False,
                                   pin_memory=False)
        dm.setup("fit")
        return dm

    def batches(loader) -> list[torch.Tensor]:
        return [images for images, _ in loader]

    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    full = module().train_dataloader()
    full.sampler.set_epoch(2)
    whole = batches(full)
    assert len(whole) == 10
    resumed = module()
    resumed.load_state_dict({"epoch": 2, "batches": 3, "batch_size": 12, "seed": 0, "world_size": 1})
    loader = resumed.train_dataloader()
    assert loader.sampler.epoch == 2
    assert same(batches(loader), whole[3:])  # the remaining 7 batches, in order, with the same augmentation
    assert same(batches(loader), whole)  # the skip applies to the resumed epoch only
    other = module()
    other.load_state_dict({"epoch": 2, "batches": 3, "batch_size": 6, "seed": 0, "world_size": 1})
    assert len(batches(other.train_dataloader())) == 10  # another batch size: the epoch starts again


def test_atomic_writer_leaves_only_the_checkpoint(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"x": torch.ones(2)}, tmp_path / "sub" / "a.ckpt")
    assert torch.equal(io.load_checkpoint(tmp_path / "sub" / "a.ckpt")["x"], torch.ones(2))
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.ckpt"]  # no temporary left behind


# -- every other output: atomic_write ----------------------------------------------------------------------------

def test_atomic_write_replaces_the_file_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "sub" / "out.csv"
    for text in ("first\n", "second\n"):
        with atomic_write(target, newline="") as handle:
            handle.write(text)
            assert not target.exists() or target.read_text() != text  # written beside it, moved in at the end
    assert target.read_text() == "second\n"
    with atomic_write(target, "wb") as handle:
        handle.write(b"\x89PNG")
    assert target.read_bytes() == b"\x89PNG"
    assert [p.name for p in target.parent.iterdir()] == ["out.csv"]


def test_atomic_write_failing_mid_write_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "predictions.csv"
    target.write_text("the good file\n")
    with pytest.raises(RuntimeError, match="the writer broke"), atomic_write(target) as handle:
        handle.write("half of a new one")
        raise RuntimeError("the writer broke")
    assert target.read_text() == "the good file\n"

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("convmixer_pl.files.os.fsync", full)  # the disk fills while the new file is written
    with pytest.raises(OutputError) as error, atomic_write(target) as handle:
        handle.write("a new file")
    message = str(error.value)
    assert message.startswith(f"cannot write {target}: no space left") and "free some space" in message
    assert "\n" not in message
    assert target.read_text() == "the good file\n"
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.csv"]  # no temporary left
    assert not list(tmp_path.glob(f".*{OUTPUT_TMP_SUFFIX}"))


def test_atomic_write_to_a_folder_or_under_a_file_is_one_line(tmp_path):
    folder = tmp_path / "plots"
    folder.mkdir()
    with pytest.raises(OutputError, match=rf"^cannot write {re.escape(str(folder))}: it is a folder; give a file"):
        with atomic_write(folder) as handle:
            handle.write("x")
    assert folder.is_dir() and not list(folder.iterdir())
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    for target in (a_file / "out.csv", a_file / "deeper" / "out.csv"):
        with pytest.raises(OutputError, match=rf"^cannot write {re.escape(str(target))}: a file is in the way"):
            with atomic_write(target) as handle:
                handle.write("x")
    assert a_file.read_text() == "mine"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="permissions do not bind root")
def test_atomic_write_into_a_read_only_folder_is_one_line(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    (folder / "out.csv").write_text("old")
    folder.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="Permission denied; choose a folder you can write to"):
            with atomic_write(folder / "out.csv") as handle:
                handle.write("new")
    finally:
        folder.chmod(0o755)
    assert (folder / "out.csv").read_text() == "old"
