"""The `convmixer` command: LightningCLI with stable checkpoint folders and safe evaluation defaults."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .data import ImageDataModule
from .module import ConvMixerClassifier

EVAL_SUBCOMMANDS = ("validate", "test", "predict")


class CLIError(ValueError):
    """A bad command line or config value; the message says which and how to fix it."""


def _say(message: str) -> None:
    if int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0:
        print(f"convmixer: {message}", file=sys.stderr)


def best_or_last(dirpath: Path) -> Path | None:
    """The best checkpoint recorded in `last.ckpt` if it still exists, else `last.ckpt`, else None."""
    last = dirpath / "last.ckpt"
    if not last.is_file():
        return None
    state = torch.load(last, map_location="cpu", weights_only=False, mmap=True)
    for key, value in state.get("callbacks", {}).items():
        if key.startswith("ModelCheckpoint") and value.get("best_model_path"):
            best = Path(value["best_model_path"])
            if best.is_file():
                return best
    return last


class ConvMixerCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True) -> None:
        super().__init__(
            ConvMixerClassifier,
            ImageDataModule,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--name", type=str, default="default",
                            help="Experiment name: checkpoints and logs go to checkpoints/<name>/ unless "
                                 "checkpoint.dirpath says otherwise")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
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
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        config = self.config[subcommand]
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(Path("checkpoints") / config.name)
        if config.trainer.default_root_dir is None:
            config.trainer.default_root_dir = config.checkpoint.dirpath
        config.ckpt_path = self._resolve_ckpt_path(subcommand, config.ckpt_path, Path(config.checkpoint.dirpath))
        self._fall_back_to_cpu(config.trainer)

    @staticmethod
    def _resolve_ckpt_path(subcommand: str, ckpt_path: str | None, dirpath: Path) -> str | None:
        """Turn `last`, `best` or nothing into a file of this run, so no command evaluates untrained weights."""
        if ckpt_path is None and subcommand == "fit":
            return None
        if ckpt_path in (None, "best", "last"):
            found = (dirpath / "last.ckpt" if ckpt_path == "last" else best_or_last(dirpath))
            if found is not None and found.is_file():
                _say(f"{subcommand} uses {found}")
                return str(found)
            if subcommand == "fit":
                _say(f"--ckpt_path last: no {dirpath / 'last.ckpt'} yet, so training starts from scratch")
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
            changes.append(f"accelerator {trainer.accelerator} -> cpu")
            trainer.accelerator = "cpu"
            if trainer.devices not in (1, "1"):
                changes.append(f"devices {trainer.devices} -> 1")
                trainer.devices = 1
            if trainer.strategy not in ("auto", None):
                changes.append(f"strategy {trainer.strategy} -> auto")
                trainer.strategy = "auto"
        if trainer.accelerator in ("gpu", "cuda", "cpu", "auto") and str(trainer.precision) in ("16-mixed", "16"):
            changes.append(f"precision {trainer.precision} -> bf16-mixed")
            trainer.precision = "bf16-mixed"
        if changes:
            _say("no GPU found; falling back: " + ", ".join(changes))


def main(args=None) -> None:
    try:
        ConvMixerCLI(args=args)
    except (ValueError, MisconfigurationException) as err:
        if os.environ.get("CONVMIXER_DEBUG"):
            raise
        print(f"convmixer: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
