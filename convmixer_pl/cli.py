"""The `convmixer` command: LightningCLI with stable checkpoint folders and safe evaluation defaults."""

from __future__ import annotations

import inspect
import os
import re
import signal
import sys
from pathlib import Path

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor, ModelSummary, RichModelSummary
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

from .data import ImageDataModule
from .module import ConvMixerClassifier
from .plots import PlotWriter
from .predict import FolderPredictDataModule, PredictionWriter, folder_data_args
from .reliability import (
    EpochCheckpoint,
    FaultTolerance,
    TrainingStopped,
    check_compatible,
    check_resumable,
    check_writable,
    read_checkpoint,
    say,
)
from .throughput import ThroughputCallback


class CLIError(ValueError):
    """A bad command line or config value; the message says which and how to fix it."""


def best_or_last(dirpath: Path) -> Path | None:
    """The best checkpoint recorded in `last.ckpt` if it still exists, else `last.ckpt`, else None."""
    last = dirpath / "last.ckpt"
    if not last.is_file():
        return None
    state = read_checkpoint(last)  # a damaged file: one line naming it, not a traceback
    for key, value in state.get("callbacks", {}).items():
        if key.startswith("ModelCheckpoint") and value.get("best_model_path"):
            best = Path(value["best_model_path"])
            if best.is_file():
                return best
    return last


def default_loggers(root: str) -> list:
    """TensorBoard and CSV logs in one folder per run: <root>/lightning_logs/version_N/."""
    tensorboard = TensorBoardLogger(root)
    csv = CSVLogger(root, version=tensorboard.version)
    csv.experiment  # noqa: B018 -- opens the folder while empty: later, CSVLogger warns about files in it
    return [tensorboard, csv]


class ConvMixerParser(LightningArgumentParser):
    """A bad key or value is one line naming it (not the whole usage text); exit code 2 as before."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or os.environ.get("CONVMIXER_DEBUG"):
            return super().error(message, ex)
        prog = (getattr(ex, "subcommand_parser", None) or self).prog.replace(" [options]", "")
        print(f"convmixer: error: {_short_parser_message(message)} (`{prog} --help` lists the options)",
              file=sys.stderr)
        sys.exit(2)


def _short_parser_message(message: str) -> str:
    """jsonargparse's message on one line; its multi-line "Union subtypes" report cut to key, value and types."""
    text = " ".join(message.split())
    union = re.match(r'(Parser key "[^"]+"): Does not validate against any of the Union subtypes Subtypes: '
                     r'\[(.*?)\] Errors: .* Given value: (.*)$', text)
    if union:
        types = [name.rsplit(".", 1)[-1].replace("NoneType", "null")
                 for name in re.findall(r"<class '([\w.]+)'>", union[2])]
        return f"{union[1]}: got {union[3]!r}, expected {' or '.join(types)}"
    return text


class ConvMixerCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True) -> None:
        self._checkpoint: tuple[str, dict] | None = None  # the --ckpt_path file, read once to check it
        super().__init__(
            ConvMixerClassifier,
            ImageDataModule,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_class=ConvMixerParser,
            trainer_defaults={"callbacks": [ThroughputCallback()]},  # train/images_per_sec in every fit's logs
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--name", type=str, default="default",
                            help="Experiment name: checkpoints and logs go to checkpoints/<name>/ unless "
                                 "checkpoint.dirpath says otherwise")
        parser.add_lightning_class_args(EpochCheckpoint, "checkpoint")
        # exact resume, reliability.every_n_train_steps saves, signal-safe stops, non-finite-loss guard
        parser.add_lightning_class_args(FaultTolerance, "reliability")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(PlotWriter, "plots")
        parser.set_defaults({
            "checkpoint.monitor": "val/acc1",
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,
            "checkpoint.filename": "epoch{epoch:03d}",
            "checkpoint.auto_insert_metric_name": False,
            "data": {"class_path": "convmixer_pl.data.DigitsDataModule"},
        })
        for key in ("num_classes", "in_chans", "image_size"):
            parser.link_arguments(f"data.{key}", f"model.{key}", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        if args is None:  # rewritten in place: DDP ranks re-run sys.argv and must see the same command
            sys.argv[1:] = folder_data_args(sys.argv[1:])
        elif isinstance(args, (list, tuple)):
            args = folder_data_args(list(args))
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        config = self.config[subcommand]
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(Path("checkpoints") / config.name)
        if config.trainer.default_root_dir is None:
            config.trainer.default_root_dir = config.checkpoint.dirpath
        try:
            config.ckpt_path = self._resolve_ckpt_path(subcommand, config.ckpt_path, Path(config.checkpoint.dirpath))
        except CLIError:
            if not config.model.get("pretrained"):
                raise
            # no checkpoint of this run: evaluate the released weights that model.pretrained names
            say(f"{subcommand} uses the weights of model.pretrained {config.model.pretrained}")
        self._check_checkpoint_and_folders(subcommand, config)
        data = config.get("data")
        folder = f"{FolderPredictDataModule.__module__}.{FolderPredictDataModule.__name__}"
        if data is not None and data.get("class_path") == folder and data.init_args.get("ckpt_path") is None:
            data.init_args.ckpt_path = config.ckpt_path  # preprocessing and class names come from the checkpoint
        self._fall_back_to_cpu(config.trainer)

    def _check_checkpoint_and_folders(self, subcommand: str, config) -> None:
        """Refuse, in one line, a --ckpt_path that is not a usable checkpoint and a folder that cannot be written."""
        if config.ckpt_path is not None:  # before Lightning reads it (right after this method)
            checkpoint = read_checkpoint(config.ckpt_path)
            if subcommand == "fit":
                check_resumable(config.ckpt_path, checkpoint)
            self._checkpoint = (config.ckpt_path, checkpoint)
            saved = checkpoint.get("hyper_parameters", {})
            accepted = set(inspect.signature(ConvMixerClassifier.__init__).parameters) | {"_instantiator"}
            if unknown := sorted(set(saved) - accepted):
                raise CLIError(f"--ckpt_path {config.ckpt_path} was written by another model (its hyper-parameters "
                               f"{', '.join(unknown[:5])} are not ConvMixerClassifier's); pass a checkpoint written "
                               "by `convmixer fit`")
            differ = [f"{key} {saved[key]} (not {config.model.get(key)})" for key in
                      ("dim", "depth", "kernel_size", "patch_size", "act")
                      if key in saved and config.model.get(key) is not None and saved[key] != config.model.get(key)]
            if differ:
                say(f"the model is built as {config.ckpt_path} was trained: " + ", ".join(differ))
        if subcommand == "fit":
            check_writable(config.checkpoint.dirpath, "checkpoint.dirpath")
        if config.trainer.get("logger") is not False:
            check_writable(config.trainer.default_root_dir, "trainer.default_root_dir")

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        if self._checkpoint is not None and self.model is not None:
            check_compatible(*self._checkpoint, self.model)  # e.g. another class count: one line, not a traceback

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.config.get("subcommand") or "", self.config)
        if config.get("ckpt_path") and config.model.get("pretrained"):
            config.model.pretrained = None  # the checkpoint holds the weights; don't read the file again

    def instantiate_trainer(self, **kwargs):
        """Default TensorBoard + CSV loggers, a learning-rate monitor and a model summary down to the blocks;
        a logger, summary or monitor set in the config or on the command line wins."""
        trainer = self._get(self.config_init, "trainer", default={})
        callbacks = list(trainer.get("callbacks") or [])
        if trainer.get("logger") in (None, True):
            kwargs.setdefault("logger", default_loggers(trainer.get("default_root_dir") or os.getcwd()))
        if trainer.get("logger") is not False and not any(isinstance(c, LearningRateMonitor) for c in callbacks):
            callbacks.append(LearningRateMonitor())
        if trainer.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary)
                                                                         for c in callbacks):
            # Lightning's own choice, Rich where installed, one level deeper: stem, blocks, pooling, head
            callbacks.append(RichModelSummary(max_depth=2) if _RICH_AVAILABLE else ModelSummary(max_depth=2))
        kwargs.setdefault("callbacks", callbacks)
        return super().instantiate_trainer(**kwargs)

    @staticmethod
    def _resolve_ckpt_path(subcommand: str, ckpt_path: str | None, dirpath: Path) -> str | None:
        """Turn `last`, `best` or nothing into a file of this run, so no command evaluates untrained weights."""
        if ckpt_path is None and subcommand == "fit":
            return None
        if ckpt_path in (None, "best", "last"):
            found = (dirpath / "last.ckpt" if ckpt_path == "last" else best_or_last(dirpath))
            if found is not None and found.is_file():
                say(f"{subcommand} uses {found}")
                return str(found)
            if subcommand == "fit":
                say(f"--ckpt_path last: no {dirpath / 'last.ckpt'} yet, so training starts from scratch")
                return None
            raise CLIError(f"no checkpoint in {dirpath}/ to {subcommand}: train first with `convmixer fit` and the "
                           "same --config/--name, or pass --ckpt_path <file.ckpt>")
        if not Path(ckpt_path).is_file():
            raise CLIError(f"--ckpt_path {ckpt_path}: no such file; pass a .ckpt written by `convmixer fit`, "
                           "or `last`/`best`")
        return ckpt_path

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


def _one_line(err: BaseException) -> str:
    """The message of the project's own error behind `err`, on one line.

    jsonargparse wraps errors raised while building the model or data module, and a DataLoader worker re-raises
    with the worker's traceback in the message; the user needs the original sentence.
    """
    chain: list[BaseException] = []
    while err is not None and len(chain) < 20:
        chain.append(err)
        err = err.__cause__ or err.__context__
    own = next((e for e in chain if type(e).__module__.startswith("convmixer_pl")), None)
    if own is None:
        own = chain[-1] if "\n" in str(chain[0]) and isinstance(chain[-1], ValueError) else chain[0]
    message = str(own).strip()
    if "Original Traceback" in message:
        message = message.splitlines()[-1]
        prefix = f"{type(own).__module__}.{type(own).__qualname__}: "
        message = message[len(prefix):] if message.startswith(prefix) else message
    return " ".join(message.split())


def main(args=None) -> None:
    try:
        ConvMixerCLI(args=args)
    except TrainingStopped as err:  # a signal or a non-finite loss: the message says what was saved
        if os.environ.get("CONVMIXER_DEBUG"):
            raise
        say(str(err))  # decided by all processes together, so once for the job
        sys.exit(err.exit_code)
    except SIGTERMException:  # Lightning's own stop: SIGTERM before training began, or a second one
        say("stopped by SIGTERM without saving a checkpoint")
        sys.exit(128 + signal.SIGTERM)
    except (ValueError, MisconfigurationException) as err:
        if os.environ.get("CONVMIXER_DEBUG"):
            raise
        print(f"convmixer: error: {_one_line(err)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
