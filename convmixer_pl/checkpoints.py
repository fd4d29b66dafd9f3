"""Checkpoint files: finding a run's best or last one, reading and checking one, loading the trained module from
one, and writing them (the run's `ModelCheckpoint` and an atomic writer).

A run's folder (`checkpoint.dirpath`, by default `checkpoints/<name>/`) holds `epochNNN.ckpt` for the best epochs
and `last.ckpt`, rewritten after every epoch and, with `checkpoint.last_every_n_steps`, every N optimizer steps.
Each file is written beside its target, fsynced and renamed over it: a `kill -9` leaves the old file or the new.
"""

from __future__ import annotations

import inspect
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint

from .console import say
from .files import TMP_SUFFIX, atomic_write
from .model import ConvMixer
from .module import ConvMixerClassifier
from .weights import state_differences

LAST = "last.ckpt"


class CheckpointError(ValueError):
    """A `--ckpt_path` that is not a usable checkpoint, or a checkpoint folder that cannot be written."""


# -- finding -------------------------------------------------------------------------------------------------------

def best_or_last(dirpath: Path) -> Path | None:
    """The best checkpoint recorded in `last.ckpt` if it still exists, else `last.ckpt`, else None."""
    last = dirpath / LAST
    if not last.is_file():
        return None
    state = read_checkpoint(last)  # a damaged file: one line naming it, not a traceback
    best = (dirpath / Path(value["best_model_path"]).name  # this folder's, wherever the run was written
            for key, value in state.get("callbacks", {}).items()
            if key.startswith(("RunCheckpoint", "ModelCheckpoint")) and value.get("best_model_path"))
    return next((path for path in best if path.is_file()), last)


def resolve_ckpt_path(subcommand: str, ckpt_path: str | None, dirpath: Path) -> str | None:
    """Turn `last`, `best` or nothing into a file of this run, so no command evaluates untrained weights."""
    if ckpt_path is None and subcommand == "fit":
        return None
    if ckpt_path in (None, "best", "last"):
        found = dirpath / LAST if ckpt_path == "last" else best_or_last(dirpath)
        if found is not None and found.is_file():
            say(f"{subcommand} uses {found}")
            return str(found)
        if subcommand == "fit":
            say(f"--ckpt_path last: no {dirpath / LAST} yet, so training starts from scratch")
            return None
        raise CheckpointError(f"no checkpoint in {dirpath}/ to {subcommand}: train first with `convmixer fit` and "
                              "the same --config/--name, or pass --ckpt_path <file.ckpt>")
    if not Path(ckpt_path).is_file():
        raise CheckpointError(f"--ckpt_path {ckpt_path}: no such file; pass a .ckpt written by `convmixer fit`, "
                              "or `last`/`best`")
    return ckpt_path


# -- reading and checking ------------------------------------------------------------------------------------------

def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load `path` as Lightning will (weights_only, memory-mapped: only the headers are read until a tensor is used),
    turning every failure into a one-line CheckpointError."""
    if not Path(path).is_file():
        raise CheckpointError(f"--ckpt_path {path}: no such file; pass a .ckpt written by `convmixer fit`")
    try:  # torch memory-maps only its zip format (since 1.6): older files are read whole
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # noqa: BLE001 -- whatever torch raises on a file that is no checkpoint
        reason = type(err).__name__ + (f": {' '.join(str(err).split())[:160]}" if str(err) else "")
        raise CheckpointError(f"--ckpt_path {path} is not a checkpoint torch can read ({reason}); pass a .ckpt "
                              "written by `convmixer fit`, or last/best") from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"--ckpt_path {path} is not a Lightning checkpoint (it has no state_dict entry; a "
                              "bare model state dict goes in model.pretrained instead); pass a .ckpt written by "
                              "`convmixer fit`")
    if checkpoint.get("hyper_parameters"):
        upgrade_hparams(checkpoint["hyper_parameters"])
    return checkpoint


def upgrade_hparams(hparams: dict[str, Any]) -> None:
    """Hyper-parameters of checkpoints written before the preprocessing was one `data_config` (separate class_names,
    mean, std, crop_pct, interpolation): folded into one, in place, with the defaults they had then."""
    old = {key: hparams.pop(key, None) for key in ("class_names", "mean", "std", "crop_pct", "interpolation")}
    if old["mean"] is not None and old["std"] is not None and hparams.get("image_size"):
        hparams["data_config"] = {"image_size": hparams["image_size"], "in_chans": hparams.get("in_chans", 3),
                                  "mean": list(old["mean"]), "std": list(old["std"]),
                                  "crop_pct": old["crop_pct"] or 1.0,
                                  "interpolation": old["interpolation"] or "bilinear",
                                  "class_names": list(old["class_names"] or [])}


def check_hparams(path: str | os.PathLike, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's hyper-parameters, if all are ConvMixerClassifier's or ConvMixer's (`convmixer fit`'s)."""
    saved = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if k != "_instantiator"}
    accepted = set(inspect.signature(ConvMixerClassifier).parameters) | set(inspect.signature(ConvMixer).parameters)
    if unknown := sorted(set(saved) - accepted):
        raise CheckpointError(f"--ckpt_path {path} was written by another model (its hyper-parameters "
                              f"{', '.join(unknown[:5])} are not ConvMixerClassifier's); pass a checkpoint written "
                              "by `convmixer fit`")
    return saved


def check_resumable(path: str | os.PathLike, checkpoint: dict[str, Any]) -> None:
    if "optimizer_states" not in checkpoint or "loops" not in checkpoint:
        raise CheckpointError(f"--ckpt_path {path} holds weights only (saved with checkpoint.save_weights_only), so "
                              "training cannot resume from it; evaluate it with test/validate, or load it with "
                              "model.pretrained and start a new fit")


def check_compatible(path: str | os.PathLike, checkpoint: dict[str, Any], module: torch.nn.Module) -> None:
    """Raise a CheckpointError naming the difference if `checkpoint` cannot load into `module` strictly (names and
    shapes only: Lightning loads the weights)."""
    saved, wanted = checkpoint["state_dict"], module.state_dict()
    head = next((k for k in wanted if k.endswith("head.weight")), None)
    stem = next((k for k in wanted if k.endswith("stem.0.weight")), None)
    if head in saved and saved[head].shape[0] != wanted[head].shape[0]:
        raise CheckpointError(f"--ckpt_path {path} was trained for {saved[head].shape[0]} classes but the data has "
                              f"{wanted[head].shape[0]}; use the data set it was trained on, or start a new fit "
                              "with model.pretrained to fine-tune its weights")
    if stem in saved and saved[stem].shape[1] != wanted[stem].shape[1]:
        raise CheckpointError(f"--ckpt_path {path} expects {saved[stem].shape[1]}-channel images but the data has "
                              f"{wanted[stem].shape[1]}; use the data set it was trained on")
    if problems := state_differences(module, saved):
        raise CheckpointError(f"--ckpt_path {path} holds a different architecture than the model ({problems}); "
                              "pass a checkpoint of this model or drop the model options that differ")


def check_writable(folder: str | os.PathLike, what: str) -> None:
    """Create `folder` if needed and prove a file can be written there, or raise a one-line CheckpointError."""
    if not _is_local_file_protocol(folder):
        return
    if Path(folder).exists() and not Path(folder).is_dir():
        raise CheckpointError(f"{what} {folder} is a file, not a folder; choose another --checkpoint.dirpath or "
                              "--name")
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        probe = Path(folder) / f".convmixer-write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink(missing_ok=True)
    except OSError as err:
        raise CheckpointError(f"{what} {folder} cannot be written ({err.strerror or err}: {err.filename}); "
                              "choose another --checkpoint.dirpath or --name") from err


def load_module(path: str | os.PathLike):
    """The trained `ConvMixerClassifier` of a `convmixer fit` checkpoint, on the CPU, in eval mode (one read)."""
    checkpoint = read_checkpoint(path)
    hparams = check_hparams(path, checkpoint)
    if not hparams:
        raise CheckpointError(f"--ckpt_path {path} holds no hyper-parameters; pass a .ckpt written by "
                              "`convmixer fit`")
    module = ConvMixerClassifier(**{**hparams, "pretrained": None})  # the checkpoint holds the weights
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()


# -- writing -------------------------------------------------------------------------------------------------------

class AtomicCheckpointIO(TorchCheckpointIO):
    """Local checkpoints through `atomic_write`: Lightning's own writer stages the file in the system temp folder,
    which a rename cannot move atomically from another file system, and does not fsync. Remote paths (s3://, ...)
    keep Lightning's writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_write(path, "wb") as f:  # a full disk is one line naming the file; the old one stays
            torch.save(checkpoint, f)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as err:
        return isinstance(err, PermissionError)  # another user's process, alive
    return True


class RunCheckpoint(ModelCheckpoint):
    """The run's checkpoints: Lightning's `ModelCheckpoint` (best epochs by the monitored metric) whose last.ckpt
    follows every epoch, improved or not, and optionally every N optimizer steps.

    (Lightning 2.6 rewrites last.ckpt only with a top-k file, so `--ckpt_path last` would redo the epochs after the
    best; its `every_n_train_steps` turns the epoch-end top-k saves off, hence `last_every_n_steps`.)

    Args:
        last_every_n_steps: also rewrite last.ckpt every this many optimizer steps (never at step 0, once per step
            under gradient accumulation); 0 keeps the epoch-end saves only. `--ckpt_path last` resumes mid-epoch
            from it.
    """

    def __init__(self, *args, last_every_n_steps: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if last_every_n_steps < 0:
            raise CheckpointError(f"checkpoint.last_every_n_steps must be >= 0, got {last_every_n_steps}")
        self.last_every_n_steps = last_every_n_steps
        self._saved_step: int | None = None  # the step of this callback's latest step save

    def state_dict(self) -> dict[str, Any]:
        # the log folder's version too: a resumed run goes on writing the same curves
        logger = self._trainer.logger if getattr(self, "_trainer", None) is not None else None
        return {**super().state_dict(), "log_version": getattr(logger, "version", None)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A moved or copied run folder resumes into its own files: the saved paths are taken as names in this folder
        (Lightning would drop them and write last-v1.ckpt beside a stale last.ckpt). validate, test and predict write
        no checkpoint, so they skip this state and Lightning's warning that another folder's paths are not taken."""
        if getattr(self, "_trainer", None) is not None and self._trainer.state.fn != "fit":
            return
        saved = state_dict.get("dirpath")

        def here(path):
            return os.path.join(self.dirpath, os.path.basename(path)) if path else path

        moved = saved and self.dirpath and os.path.realpath(saved) != os.path.realpath(self.dirpath)
        # this folder holds the run's files (moved or copied), not a new run started from another's checkpoint
        if moved and os.path.isfile(here(state_dict.get("last_model_path") or state_dict.get("best_model_path") or "")):
            state_dict = {**state_dict, "dirpath": self.dirpath,
                          **{key: here(state_dict.get(key)) for key in ("best_model_path", "kth_best_model_path",
                                                                         "last_model_path")},
                          "best_k_models": {here(k): v for k, v in (state_dict.get("best_k_models") or {}).items()}}
        super().load_state_dict(state_dict)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer
        with warnings.catch_warnings():
            if self.dirpath and not any(Path(self.dirpath).glob("*.ckpt")):
                # the folder holds the run's logs but no checkpoint to overwrite: Lightning's warning is noise
                warnings.filterwarnings("ignore", "Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer, pl_module) -> None:
        """Delete the temporary checkpoint files that killed processes left in the folder."""
        if not trainer.is_global_zero or not self.dirpath:
            return
        for leftover in Path(self.dirpath).glob(f".*.*{TMP_SUFFIX}"):
            pid = leftover.name[: -len(TMP_SUFFIX)].rsplit(".", 1)[-1]
            if pid.isdigit() and _alive(int(pid)):
                continue  # still being written
            leftover.unlink(missing_ok=True)
            say(f"removed {leftover}, a partial checkpoint left by a killed run")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        if self.last_every_n_steps and step > 0 and step % self.last_every_n_steps == 0 and self._saved_step != step:
            self.write_last(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._save_last_if_missed(trainer, train_epoch_end=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        self._save_last_if_missed(trainer, train_epoch_end=False)

    def _save_last_if_missed(self, trainer, train_epoch_end: bool) -> None:
        """last.ckpt at the hook where Lightning saves (the train epoch's end, or validation's)."""
        if (self.save_last and self._should_save_on_train_epoch_end(trainer) == train_epoch_end
                and not self._should_skip_saving_checkpoint(trainer)):  # skips if saved at this step
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def write_last(self, trainer) -> str:
        """Write last.ckpt now (a step save, or a stop on a signal) unless this step's save was already written."""
        path = os.path.join(self.dirpath or trainer.default_root_dir, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        if self._saved_step != trainer.global_step:
            self.last_model_path = path  # part of the saved state: the resumed run keeps writing this file
            trainer.save_checkpoint(path, weights_only=False)
            self._saved_step = trainer.global_step
        return path

    def existing_checkpoint(self) -> str | None:
        """The newest checkpoint this run wrote that is still on disk, for messages after a failure."""
        return next((path for path in (self.last_model_path, self.best_model_path) if path and os.path.isfile(path)),
                    None)
