"""The `convmixer` command: LightningCLI with stable checkpoint folders and safe evaluation defaults, and the
tools (`convmixer export|plots|serve|benchmark`).

    convmixer fit|validate|test|predict --config FILE [--section.key value ...]
    convmixer <tool> --help
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

import torch
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor, ModelSummary, RichModelSummary
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

from .callbacks import PerClassReport, PlotWriter, PredictionWriter, ResumeState, StopGuard, ThroughputCallback
from .callbacks.guards import TrainingStopped
from .checkpoints import (
    AtomicCheckpointIO,
    CheckpointError,
    RunCheckpoint,
    check_compatible,
    check_hparams,
    check_resumable,
    check_writable,
    read_checkpoint,
    resolve_ckpt_path,
)
from .console import debugging, fail, run_entry_point, say
from .data import DataError, FolderPredictDataModule, ImageDataModule
from .model import VARIANTS, ConvMixer
from .module import ConvMixerClassifier

SUBCOMMANDS = ("fit", "validate", "test", "predict")
LINKED = ("num_classes", "in_chans", "image_size", "class_names", "mean", "std", "crop_pct", "interpolation")
TOOLS = {  # convmixer <tool> ...: module and what it does
    "export": ("convmixer_pl.export", "export a checkpoint (ONNX, torch.export, a timm/Hugging Face folder)"),
    "serve": ("convmixer_pl.serve", "serve a checkpoint over HTTP (LitServe)"),
    "plots": ("convmixer_pl.plots", "draw a checkpoint's pictures again"),
    "benchmark": ("convmixer_pl.benchmark", "training and inference speed against a plain PyTorch loop"),
}


class CLIError(ValueError):
    """A bad command line or config value; the message says which and how to fix it."""


def default_loggers(root: str) -> list:
    """TensorBoard and CSV logs in one folder per run: <root>/lightning_logs/version_N/."""
    tensorboard = TensorBoardLogger(root)
    csv = CSVLogger(root, version=tensorboard.version)
    csv.experiment  # noqa: B018 -- opens the folder while empty: later, CSVLogger warns about files in it
    return [tensorboard, csv]


def expand_shorthands(argv: list[str]) -> list[str]:
    """`--model <variant>` becomes that variant's architecture (`convmixer_pl.model.VARIANTS`), and for `predict`
    `--data <folder>` becomes `--data FolderPredictDataModule --data.root <folder>`. jsonargparse reads either
    value as a class name or a config file; a variant name and a folder are neither."""
    subcommand = next((arg for arg in argv if arg in SUBCOMMANDS), None)
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--model", "--data") and i + 1 < len(argv):
            key, value, i = arg, argv[i + 1], i + 2
        elif arg.startswith(("--model=", "--data=")):
            (key, value), i = arg.split("=", 1), i + 1
        else:
            out.append(arg)
            i += 1
            continue
        if key == "--model" and value in VARIANTS:
            arch = {k: v for k, v in VARIANTS[value].items() if k not in LINKED}  # those come from the data
            out += ["--model", yaml.safe_dump(arch)]
        elif key == "--data" and subcommand == "predict" and Path(value).is_dir():
            out += ["--data", f"{FolderPredictDataModule.__module__}.{FolderPredictDataModule.__name__}",
                    "--data.root", value]
        elif (key == "--data" and subcommand == "predict" and os.sep in value and not value.lstrip().startswith("{")
              and not Path(value).exists()):
            raise DataError(f"--data {value}: no such folder of images (or config file)")
        else:
            out += [key, value]
    return out


def checkpoint_model_args(argv: list[str], read=read_checkpoint) -> tuple[list[str], tuple[str, dict] | None]:
    """`argv` with the architecture of the file that `--ckpt_path` names put first (right after the subcommand),
    so that `convmixer test|predict --ckpt_path X` needs no model options; later options still override it (and
    Lightning applies the checkpoint's hyper-parameters after parsing). Also the checkpoint, read once."""
    value = next((argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--ckpt_path"),
                 next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--ckpt_path=")), None))
    subcommand = next((i for i, arg in enumerate(argv) if arg in SUBCOMMANDS), None)
    if value is None or subcommand is None or value in ("last", "best"):
        return argv, None
    if not Path(value).is_file():  # said now: parsing would first ask for the architecture it would have given
        raise CheckpointError(f"--ckpt_path {value}: no such file; pass a .ckpt written by `convmixer fit`, or "
                              "`last`/`best`")
    checkpoint = read(value)
    names = set(inspect.signature(ConvMixer).parameters) - set(LINKED)
    arch = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if k in names}
    if not arch:
        return argv, (value, checkpoint)
    return [*argv[:subcommand + 1], "--model", yaml.safe_dump(arch), *argv[subcommand + 1:]], (value, checkpoint)


class ConvMixerParser(LightningArgumentParser):
    """A bad key or value is one line naming it (not the whole usage text); exit code 2 as before."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or debugging():
            return super().error(message, ex)
        prog = (getattr(ex, "subcommand_parser", None) or self).prog.replace(" [options]", "")
        fail(f"{' '.join(message.split())} (`{prog} --help` lists the options)")


class ConvMixerCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True) -> None:
        self._checkpoint: tuple[str, dict] | None = None  # the --ckpt_path file, read once to check it
        tools = "; ".join(f"convmixer {name}: {what}" for name, (_, what) in TOOLS.items())
        super().__init__(
            ConvMixerClassifier,
            ImageDataModule,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_class=ConvMixerParser,
            parser_kwargs={"description": f"Train and evaluate ConvMixer. Tools: {tools}."},
            # images/s in every fit's logs; every process's RNG states in every checkpoint (exact resume)
            trainer_defaults={"callbacks": [ThroughputCallback(), ResumeState()]},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--name", type=str, default="default",
                            help="Experiment name: checkpoints and logs go to checkpoints/<name>/ unless "
                                 "checkpoint.dirpath says otherwise")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.add_lightning_class_args(StopGuard, "reliability")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(PlotWriter, "plots")
        parser.add_lightning_class_args(PerClassReport, "report")
        parser.set_defaults({
            "checkpoint.monitor": "val/acc1",
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,
            "checkpoint.filename": "epoch{epoch:03d}",
            "checkpoint.auto_insert_metric_name": False,
            "data": {"class_path": "convmixer_pl.data.DigitsDataModule"},
        })
        for key in LINKED:  # a data module that does not know one (a folder to predict) leaves the model's
            parser.link_arguments(f"data.{key}", f"model.{key}", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        # sys.argv is read, not rewritten: DDP ranks re-run the same command line and expand it the same way
        argv = sys.argv[1:] if args is None else args
        if isinstance(argv, dict):
            self.config = parser.parse_object(argv)
        else:
            argv, self._checkpoint = checkpoint_model_args(expand_shorthands([str(a) for a in argv]))
            self.config = parser.parse_args(argv)
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        config = self.config[subcommand]
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(Path("checkpoints") / config.name)
        if config.trainer.default_root_dir is None:
            config.trainer.default_root_dir = config.checkpoint.dirpath
        try:
            config.ckpt_path = resolve_ckpt_path(subcommand, config.ckpt_path, Path(config.checkpoint.dirpath))
        except CheckpointError:
            if not config.model.get("pretrained"):
                raise
            # no checkpoint of this run: evaluate the released weights that model.pretrained names
            say(f"{subcommand} uses the weights of model.pretrained {config.model.pretrained}")
        self._check_checkpoint_and_folders(subcommand, config)
        self._fall_back_to_cpu(config.trainer)

    def _check_checkpoint_and_folders(self, subcommand: str, config) -> None:
        """Refuse, in one line, a --ckpt_path that is not a usable checkpoint and a folder that cannot be written."""
        if config.ckpt_path is not None:  # before Lightning reads it (right after this method)
            known = self._checkpoint
            checkpoint = known[1] if known and known[0] == config.ckpt_path else read_checkpoint(config.ckpt_path)
            if subcommand == "fit":
                check_resumable(config.ckpt_path, checkpoint)
            self._checkpoint = (config.ckpt_path, checkpoint)
            accepted = (set(inspect.signature(ConvMixerClassifier).parameters)
                        | set(inspect.signature(ConvMixer).parameters))
            saved = check_hparams(config.ckpt_path, checkpoint, accepted)
            differ = [f"{key} {saved[key]} (not {config.model.get(key)})" for key in
                      ("dim", "depth", "kernel_size", "patch_size", "act")
                      if key in saved and config.model.get(key) is not None and saved[key] != config.model.get(key)]
            if differ:
                say(f"the model is built as {config.ckpt_path} was trained: " + ", ".join(differ))
        if subcommand == "fit":
            check_writable(config.checkpoint.dirpath, "checkpoint.dirpath")
        if config.trainer.get("logger") is not False:
            check_writable(config.trainer.default_root_dir, "trainer.default_root_dir")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.config.get("subcommand") or "", self.config)
        if config.get("ckpt_path") and config.model.get("pretrained"):
            config.model.pretrained = None  # the checkpoint holds the weights; don't read the file again

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        if self._checkpoint is not None and self.model is not None:
            check_compatible(*self._checkpoint, self.model)  # e.g. another class count: one line, not a traceback

    def instantiate_trainer(self, **kwargs):
        """Default TensorBoard + CSV loggers, a learning-rate monitor, a model summary down to the blocks and the
        atomic checkpoint writer; a logger, summary, monitor or plugin set in the config or on the command line
        wins."""
        trainer = self._get(self.config_init, "trainer", default={})
        callbacks = list(trainer.get("callbacks") or [])
        if trainer.get("logger") in (None, True):
            kwargs.setdefault("logger", default_loggers(trainer.get("default_root_dir") or os.getcwd()))
        if trainer.get("logger") is not False and not any(isinstance(c, LearningRateMonitor) for c in callbacks):
            callbacks.append(LearningRateMonitor())
        if trainer.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary)
                                                                         for c in callbacks):
            # Lightning's own choice, Rich where installed, one level deeper: stem, blocks, pooling, head; the
            # Trainer's own default summary is then switched off (else it says it skipped it)
            callbacks.append(RichModelSummary(max_depth=2) if _RICH_AVAILABLE else ModelSummary(max_depth=2))
            kwargs.setdefault("enable_model_summary", False)
        kwargs.setdefault("callbacks", callbacks)
        if not trainer.get("plugins"):
            kwargs.setdefault("plugins", [AtomicCheckpointIO()])
        return super().instantiate_trainer(**kwargs)

    @staticmethod
    def _fall_back_to_cpu(trainer) -> None:
        """Run a GPU config on a machine without one, saying what changed, instead of crashing."""
        if torch.cuda.is_available():
            return
        changes = []
        if trainer.accelerator in ("gpu", "cuda"):
            if (trainer.num_nodes or 1) > 1:  # one CPU process per node would wait for GPU ranks that never come
                raise CLIError(f"trainer.num_nodes is {trainer.num_nodes} with accelerator {trainer.accelerator}, but "
                               "this machine has no GPU: launch multi-node runs on the GPU nodes "
                               "(docs/distributed.md), or set --trainer.accelerator cpu for CPU processes")
            changes.append(f"accelerator {trainer.accelerator} -> cpu")
            trainer.accelerator = "cpu"
            if trainer.devices not in (1, "1"):
                changes.append(f"devices {trainer.devices} -> 1")
                trainer.devices = 1
            if trainer.strategy not in ("auto", None):
                strategy = getattr(trainer.strategy, "class_path", trainer.strategy)  # a name or a class_path
                changes.append(f"strategy {str(strategy).rsplit('.', 1)[-1]} -> auto")
                trainer.strategy = "auto"
        if trainer.accelerator in ("gpu", "cuda", "cpu", "auto") and str(trainer.precision) in ("16-mixed", "16"):
            changes.append(f"precision {trainer.precision} -> bf16-mixed")
            trainer.precision = "bf16-mixed"
        if changes:
            say("no GPU found; falling back: " + ", ".join(changes))


def _run_cli(args) -> None:
    try:
        ConvMixerCLI(args=args)
    except TrainingStopped as err:  # a signal or a non-finite loss: the message says what was saved
        if debugging():
            raise
        say(str(err))  # decided by all processes together, so once for the job
        sys.exit(err.exit_code)
    except SIGTERMException:  # Lightning's own stop: SIGTERM before training began, or a second one
        say("stopped by SIGTERM without saving a checkpoint")
        sys.exit(128 + signal.SIGTERM)


def quiet_known_noise() -> None:
    """Leave out what Lightning and torch print that a user of this command cannot act on: the tips to install
    Lightning's cloud services, a deprecation inside Lightning's own code, and torch's note, when it compiles the
    CPU depthwise kernel on a machine with CUDA's headers but no GPU, that there is no CUDA runtime."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not str(record.getMessage()).startswith("💡 Tip:"))
    logging.getLogger("torch.utils.cpp_extension").addFilter(
        lambda record: not str(record.getMessage()).startswith("No CUDA runtime is found"))
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            module=r"lightning\.pytorch\.utilities\._pytree")


def main(args: list[str] | None = None) -> None:
    quiet_known_noise()
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in TOOLS:
        import importlib

        return importlib.import_module(TOOLS[argv[0]][0]).main(argv[1:])
    run_entry_point(lambda: _run_cli(args))


if __name__ == "__main__":
    main()
