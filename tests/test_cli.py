"""The installed `convmixer` command end to end: fit, test, resume, configs, CPU fallback, help.

One tiny training run is shared by the tests of this file (module-scoped fixtures, in this order: print the
config, fit from it, test it twice, resume it). Each `convmixer` process spends seconds importing, so commands
that stop before training (--print_config, --help, refusals) run `main()` in this process instead.
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import io
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIGS, TINY_DIGITS
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from convmixer_pl.checkpoints import RunCheckpoint, load_module
from convmixer_pl.cli import FULL_HELP, ConvMixerCLI, main
from convmixer_pl.data import CIFARDataModule, DigitsDataModule, ImageDataModule, ImageFolderDataModule
from convmixer_pl.model import VARIANTS, ConvMixer
from convmixer_pl.module import ConvMixerClassifier

# A small model with a high learning rate learns visibly in 8 steps; gpu.yaml exercises the CPU fallback.
TINY = ["--config", CONFIGS / "digits.yaml", "--trainer", CONFIGS / "trainer" / "gpu.yaml", "--name", "tiny",
        "--model.dim", "32", "--model.depth", "1", "--model.lr", "0.05", "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "8", "--trainer.limit_val_batches", "2", "--trainer.log_every_n_steps", "1"]
STEPS = 8  # per epoch


def _metrics(stdout: str) -> dict[str, float]:
    """The numbers of Lightning's `Test metric | DataLoader 0` table."""
    return {name: float(value) for name, value in re.findall(r"(test/\w+)\W+([0-9][0-9.e+-]*)", stdout)}


def _scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def _fit_logs(dirpath: Path) -> list[Path]:
    """The log folders of this run's `fit` commands, oldest first (`test` commands log into folders too)."""
    folders = sorted((dirpath / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    return [folder for folder in folders
            if "train/loss_step" in EventAccumulator(str(folder)).Reload().Tags()["scalars"]]


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("convmixer: error:")]


def _evaluate(module: ConvMixerClassifier) -> dict[str, float]:
    """Test loss and accuracy of a network on the digits test split, computed here."""
    data = DigitsDataModule(image_size=16, batch_size=1000, num_workers=0)
    data.setup("test")
    images, targets = next(iter(data.test_dataloader()))
    with torch.no_grad():
        logits = module.eval().model(images)
    return {"test/loss": F.cross_entropy(logits, targets).item(),
            "test/acc1": (logits.argmax(1) == targets).float().mean().item()}


def _load(checkpoint: Path) -> ConvMixerClassifier:
    return ConvMixerClassifier.load_from_checkpoint(checkpoint, map_location="cpu")


def _main(*args: str, cwd: Path | None = None) -> SimpleNamespace:
    """`convmixer ARGS` in this process, for commands that stop before training: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        patch.setattr(sys, "argv", ["convmixer"])
        patch.setenv("COLUMNS", "200")
        if cwd is not None:
            patch.chdir(cwd)
        with pytest.raises(SystemExit) as info:
            main([str(arg) for arg in args])
    return SimpleNamespace(returncode=info.value.code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture(scope="module")
def run(tmp_path_factory, convmixer):
    """`fit --print_config` with the tiny settings, then the installed command's `fit --config` of that file."""
    cwd = tmp_path_factory.mktemp("cli")
    printed = _main("fit", *TINY, "--print_config")
    (cwd / "tiny.yaml").write_text(printed.stdout)
    fit = convmixer("fit", "--config", "tiny.yaml", cwd=cwd)
    dirpath = cwd / "checkpoints" / "tiny"
    first = dirpath / "first.ckpt"
    if (dirpath / "last.ckpt").is_file():  # kept: the resume below overwrites last.ckpt
        shutil.copy(dirpath / "last.ckpt", first)
    return SimpleNamespace(cwd=cwd, printed=printed, fit=fit, dirpath=dirpath, first=first)


@pytest.fixture(scope="module")
def tested(run, convmixer):
    """`test --ckpt_path last`, in fp32 like the in-process evaluation it is compared with."""
    return convmixer("test", "--config", "tiny.yaml", "--ckpt_path", "last", "--trainer.precision", "32-true",
                     cwd=run.cwd)


@pytest.fixture(scope="module")
def resumed(run, tested, convmixer):
    """The same fit again, resumed from its last.ckpt for a second epoch (after the tests used the first)."""
    return convmixer("fit", "--config", "tiny.yaml", "--ckpt_path", "last", "--trainer.max_epochs", "2", cwd=run.cwd)


def test_print_config_feeds_back_and_fit_writes_checkpoints(run):
    assert run.printed.returncode == 0
    assert "accelerator: gpu" in run.printed.stdout and "dim: 32" in run.printed.stdout
    assert run.fit.returncode == 0, run.fit.stderr[-3000:]
    assert (run.dirpath / "last.ckpt").is_file() and (run.dirpath / "epoch000.ckpt").is_file()
    state = torch.load(run.first, map_location="cpu", weights_only=False)
    assert (state["epoch"], state["global_step"]) == (0, STEPS)  # the index of the epoch that just ended
    assert state["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"] == 1
    assert state["hyper_parameters"]["dim"] == 32 and state["hyper_parameters"]["lr"] == 0.05
    assert not list(run.cwd.glob("lightning_logs")), "logs belong under checkpoints/<name>/"


def test_gpu_trainer_config_falls_back_to_the_cpu_with_one_warning(run):
    assert run.fit.returncode == 0
    warnings = [line for line in run.fit.stderr.splitlines() if "falling back" in line]
    assert len(warnings) == 1 and warnings[0].startswith("convmixer: ")
    assert "accelerator gpu -> cpu" in warnings[0]
    assert "precision bf16-mixed -> measured on this CPU" in warnings[0]  # never emulated bf16 on a CPU without it


def test_test_with_ckpt_path_last_reports_that_checkpoints_metrics(run, tested):
    assert tested.returncode == 0, tested.stderr[-3000:]
    reported = _metrics(tested.stdout)
    assert {"test/acc1", "test/acc5", "test/loss"} <= set(reported), tested.stdout
    trained = _load(run.first)
    expected = _evaluate(trained)
    assert reported["test/loss"] == pytest.approx(expected["test/loss"], abs=1e-4)
    assert reported["test/acc1"] == pytest.approx(expected["test/acc1"], abs=1e-6)
    # an untrained network is far outside that tolerance (after 8 steps the BatchNorm statistics are still
    # young, so the trained network's eval-mode loss is not much lower; the digits run below checks accuracy)
    untrained = ConvMixerClassifier(**{**trained.hparams, "pretrained": None})
    assert abs(_evaluate(untrained)["test/loss"] - reported["test/loss"]) > 2e-3


def test_test_refuses_without_a_checkpoint(run):
    result = _main("test", "--config", "tiny.yaml", "--name", "untrained", cwd=run.cwd)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = _error_lines(result.stderr)
    assert len(errors) == 1 and "no checkpoint" in errors[0] and "untrained" in errors[0], result.stderr
    assert not _metrics(result.stdout) and not (run.cwd / "checkpoints" / "untrained").exists()


def test_resume_continues_the_run(run, resumed):
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "convmixer: fit uses" in resumed.stderr and "last.ckpt" in resumed.stderr
    state = torch.load(run.dirpath / "last.ckpt", map_location="cpu", weights_only=False)
    assert (state["epoch"], state["global_step"]) == (1, 2 * STEPS)
    assert state["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"] == 2
    adam_steps = {float(s["step"]) for s in state["optimizer_states"][0]["state"].values()}
    assert adam_steps == {2.0 * STEPS}  # the optimizer's moments carried over rather than restarting

    # the second run goes on logging into the first run's folder: steps 8..15 after 0..7, starting from the
    # first run's loss level, and both epochs in one metrics.csv (the curves of the whole run)
    logs = _fit_logs(run.dirpath)
    assert len(logs) == 1
    steps = _scalars(logs[0], "train/loss_step")
    assert [step for step, _ in steps] == list(range(2 * STEPS))
    assert steps[STEPS][1] < 0.85 * steps[0][1]  # from scratch it would start near ln(10) = 2.30 again
    epoch_loss = [value for _, value in _scalars(logs[0], "train/loss_epoch")]
    assert len(epoch_loss) == 2 and epoch_loss[1] < epoch_loss[0]
    with open(logs[0] / "metrics.csv", newline="") as f:
        epochs = [row["epoch"] for row in csv.DictReader(f) if row.get("train/loss_epoch")]
    assert epochs == ["0", "1"]


class _FirstEpochBest(ConvMixerClassifier):
    def on_validation_epoch_end(self) -> None:
        self.log("score", -float(self.current_epoch))  # never improves after the first epoch


class _PeekLast(L.Callback):
    def __init__(self, path: Path) -> None:
        self.path, self.steps = path, []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.steps.append(torch.load(self.path, weights_only=False)["global_step"] if self.path.is_file() else None)


def test_last_checkpoint_follows_every_epoch_not_only_the_best(tmp_path):
    checkpoint = RunCheckpoint(dirpath=tmp_path, monitor="score", mode="max", save_last=True,
                                 filename="epoch{epoch:03d}", auto_insert_metric_name=False)
    peek = _PeekLast(tmp_path / "last.ckpt")
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, limit_train_batches=2, limit_val_batches=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[checkpoint, peek])
    trainer.fit(_FirstEpochBest(dim=8, depth=1, num_classes=10, in_chans=1), DigitsDataModule(batch_size=16))
    assert peek.steps == [None, 2, 4]  # what a `--ckpt_path last` resume after a kill would start from
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert state["global_step"] == 6
    assert [p.name for p in tmp_path.glob("epoch*.ckpt")] == ["epoch000.ckpt"]  # top-k files as before
    assert [key.split("{")[0] for key in state["callbacks"] if "monitor" in key] == ["RunCheckpoint"]


def test_a_resumed_fit_keeps_its_config_beside_its_continued_log(run, resumed):
    assert resumed.returncode == 0
    configs = [folder / "config.yaml" for folder in _fit_logs(run.dirpath)]
    assert len(configs) == 1
    assert "dim: 32" in configs[0].read_text() and "ckpt_path: " in configs[0].read_text()


def test_fit_help_is_a_short_overview_that_names_every_full_help(convmixer, tmp_path):
    result = convmixer("fit", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    assert text.startswith("usage: convmixer fit [--config FILE] [options]\n")
    assert len(text.splitlines()) < 100
    for command in FULL_HELP:
        assert f"convmixer fit {command}" in text, command
    for variant in VARIANTS:
        assert variant in text
    for option in ("--config", "--print_config", "--ckpt_path last|best|FILE", "--name", "--overwrite",
                   "--seed_everything", "--model.lr", "--data CLASS", "--data.root", "--trainer.precision"):
        assert f"  {option} " in text, option
    assert "accumulate_grad_batches" not in text and "re_prob" not in text  # in the full help only


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_every_subcommand_help_is_the_overview(subcommand):
    result = _main(subcommand, "-h")
    assert result.returncode == 0
    assert result.stdout.startswith(f"usage: convmixer {subcommand} [--config FILE] [options]\n")
    assert len(result.stdout.splitlines()) < 100 and f"convmixer {subcommand} --help all" in result.stdout


@pytest.mark.parametrize("tool", ["export", "serve", "plots", "benchmark", "sweep"])
def test_tool_help_has_a_one_line_usage(tool):
    result = _main(tool, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith(f"usage: convmixer {tool} [--config FILE] [options]\n")
    assert len(result.stdout.splitlines()) < 90


def test_group_help_lists_the_group_in_full():
    model = _main("fit", "--help", "model")
    assert model.returncode == 0
    own = [name for name, p in inspect.signature(ConvMixerClassifier).parameters.items() if p.kind != p.VAR_KEYWORD]
    for name in own + list(inspect.signature(ConvMixer).parameters):  # the architecture is ConvMixer's arguments
        assert f"--model.{name}" in model.stdout, name
    assert "--trainer." not in model.stdout
    trainer = _main("fit", "--help", "trainer").stdout
    for name in inspect.signature(L.Trainer).parameters:  # the rare options as well
        assert f"--trainer.{name}" in trainer, name
    data = _main("fit", "--help", "data").stdout
    for cls in (DigitsDataModule, CIFARDataModule, ImageFolderDataModule):
        assert f"convmixer_pl.data.{cls.__name__}" in data  # the public import path
    assert "--data.help" in data
    assert "--data.augment.re_prob" in _main("fit", "--data.help", "ImageFolderDataModule").stdout
    everything = _main("fit", "--help", "all").stdout
    assert "--trainer.accumulate_grad_batches" in everything and "--checkpoint.dirpath" in everything
    unknown = _main("fit", "--help", "modle")
    assert unknown.returncode == 2 and len(_error_lines(unknown.stderr)) == 1 and "'model'" in unknown.stderr


def test_an_option_the_overview_leaves_out_still_parses():
    printed = _main("fit", "--trainer.accumulate_grad_batches", "2", "--data", "ImageFolderDataModule",
                    "--data.augment.re_prob", "0.5", "--print_config")
    assert printed.returncode == 0, printed.stderr
    assert "accumulate_grad_batches: 2" in printed.stdout and "re_prob: 0.5" in printed.stdout


def test_test_of_another_runs_checkpoint_without_a_seed_in_its_config_is_quiet(digits_run, convmixer, tmp_path):
    """A config without seed_everything, and a checkpoint from a folder other than the run's: Lightning's
    "No seed found" and "dirpath has changed" warnings say nothing a user can act on."""
    (tmp_path / "noseed.yaml").write_text("name: elsewhere\ntrainer:\n  accelerator: cpu\ndata:\n"
                                          "  class_path: convmixer_pl.data.DigitsDataModule\n"
                                          "  init_args:\n    image_size: 8\n")
    tested = convmixer("test", "--config", "noseed.yaml", "--ckpt_path", digits_run / "last.ckpt",
                       "--report.enabled", "false", "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    assert tested.returncode == 0, tested.stderr[-2000:]
    assert "Seed set to 0" in tested.stderr
    assert "No seed found" not in tested.stderr and "dirpath has changed" not in tested.stderr, tested.stderr


@pytest.mark.parametrize("cls", [DigitsDataModule, CIFARDataModule, ImageFolderDataModule])
def test_data_help_lists_every_option(cls):
    result = _main("fit", "--data.help", cls.__name__)
    assert result.returncode == 0
    text = result.stdout
    own = [name for name, p in inspect.signature(cls).parameters.items() if p.kind != p.VAR_KEYWORD]
    for name in own + list(inspect.signature(ImageDataModule).parameters):  # and the loader options they pass on
        assert f"--data.{name}" in text, name


@pytest.fixture(scope="module")
def digits(tmp_path_factory, convmixer):
    """The README's quick start: the full digits configuration, then `test` with no checkpoint named."""
    cwd = tmp_path_factory.mktemp("digits")
    fit = convmixer("fit", "--config", CONFIGS / "digits.yaml", cwd=cwd)
    return SimpleNamespace(cwd=cwd, fit=fit, test=convmixer("test", "--config", CONFIGS / "digits.yaml", cwd=cwd))


def test_digits_config_trains_and_test_without_ckpt_path_uses_its_checkpoint(digits):
    assert digits.fit.returncode == 0, digits.fit.stderr[-3000:]
    assert digits.test.returncode == 0, digits.test.stderr[-3000:]
    used = re.search(r"convmixer: test uses (\S+\.ckpt)", digits.test.stderr)
    assert used is not None, digits.test.stderr
    assert (digits.cwd / used.group(1)).resolve().parent == (digits.cwd / "checkpoints" / "digits").resolve()
    assert _metrics(digits.test.stdout)["test/acc1"] >= 0.95  # untrained weights score about 0.1


def test_flip_tta_applies_to_a_checkpoint_from_the_command_line(digits_run, tmp_path):
    """`convmixer test --ckpt_path X --model.tta flip`: the checkpoint's hyper-parameters win over the command line
    (Lightning's rule), but tta is not one of them, so the flip is used; the metrics are the flipped ones."""
    ckpt = digits_run / "last.ckpt"
    where = ["--trainer.default_root_dir", str(tmp_path), "--report.enabled", "false"]
    plain = ConvMixerCLI(args=["test", *TINY_DIGITS, "--ckpt_path", str(ckpt), *where])
    flipped = ConvMixerCLI(args=["test", *TINY_DIGITS, "--ckpt_path", str(ckpt), "--model.tta", "flip", *where])
    assert flipped.model.tta == "flip"
    module = load_module(ckpt)
    data = DigitsDataModule(image_size=8, batch_size=1000)
    data.setup("test")
    images, targets = next(iter(data.test_dataloader()))
    with torch.no_grad():
        logits = (module(images) + module(images.flip(-1))) / 2
    expected = (logits.argmax(1) == targets).float().mean().item()
    assert flipped.trainer.callback_metrics["test/acc1"].item() == pytest.approx(expected, abs=1e-6)
    assert flipped.trainer.callback_metrics["test/loss"] != plain.trainer.callback_metrics["test/loss"]
