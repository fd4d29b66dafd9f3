"""Exact resume, crash-safe checkpoints, and a clean stop on signals and non-finite losses.

Lightning's checkpoints hold the weights, optimizer, schedulers and loop counters. For a resumed run to continue
bit for bit this module adds the rest:

- `ResumableSampler` + `ResumableDataLoader`: the training order is a permutation of (data seed, epoch), and the
  loader reports how many batches of the epoch were handed out; the callback below saves that and hands it back
  on resume, so a resumed epoch skips exactly the batches already trained on.
- `FaultTolerance` (a callback, on by default in the `convmixer` command): every rank's RNG states (python,
  numpy, torch, CUDA), restored just before the first resumed batch; the running sums behind epoch-level training
  metrics when a checkpoint is taken mid-epoch; SIGTERM/SIGINT save `last.ckpt` after the current step and stop;
  a non-finite loss stops training before its update reaches the weights, and no checkpoint with non-finite
  weights is ever written.
- `AtomicCheckpointIO`: each checkpoint goes to a temporary file in its own folder, is fsynced, then renamed over
  the old one, so a `kill -9` at any moment leaves the old file or the new one, never a torn one.
"""

from __future__ import annotations

import os
import pickle
import random
import signal
import sys
import threading
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, DistributedSampler

from .gpu_data import DeviceLoader

TMP_SUFFIX = ".convmixer-tmp"  # temporary checkpoint files: `.<name>.<pid>.convmixer-tmp` beside the target


class CheckpointError(ValueError):
    """A `--ckpt_path` that is not a usable checkpoint, or a checkpoint folder that cannot be written."""


class TrainingStopped(Exception):
    """Training ended early on purpose; `exit_code` is what the command exits with."""

    exit_code = 1


class Interrupted(TrainingStopped):
    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention for "ended by signal N"


class NonFiniteLoss(TrainingStopped):
    exit_code = 1


# ----------------------------------------------------------------------------------------------------------------
# RNG states


def rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch and (if initialised) CUDA generator states, `torch.load`-safe."""
    version, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "numpy": (version, key.tolist(), pos, has_gauss, gauss),  # plain lists: loads with weights_only=True
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    version, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((version, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _all_ranks(obj: Any) -> list[Any]:
    """`obj` from every process (one entry outside distributed runs); a collective call under DDP."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered
    return [obj]


def say(message: str) -> None:
    """One `convmixer: <message>` line on stderr, from the job's first process only: its rank is torch.distributed's
    once that is up, before that the launchers' variables (torchrun RANK, srun SLURM_PROCID, Lightning's own
    LOCAL_RANK and NODE_RANK)."""
    if dist.is_available() and dist.is_initialized():
        first = dist.get_rank() == 0
    else:
        first = all(int(os.environ.get(key, 0)) == 0 for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"))
    if first:
        print(f"convmixer: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Data position


class ResumableSampler(DistributedSampler):
    """`DistributedSampler`'s seeded per-epoch order (one shard per process) that can start part-way through.

    `start` indices of this process's shard are skipped by the next `__iter__` only; `len()` stays the full
    shard so Lightning's batch counts, schedules and `is_last_batch` are those of an uninterrupted epoch.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def __iter__(self):
        indices = list(super().__iter__())
        start, self.start = self.start, 0
        return iter(indices[start:])


class ResumableDataLoader(DataLoader):
    """A `DataLoader` over a `ResumableSampler` whose position Lightning saves in each checkpoint.

    The position is (epoch, batches handed out by the current iterator). The iterator starts lazily, at its first
    batch: by then Lightning has called `sampler.set_epoch`, so a saved position is applied only if the epoch it
    belongs to is the one starting (a checkpoint taken at an epoch's end resumes at the next epoch, unskipped).
    Worker seeds come from `generator`, reseeded from (seed, epoch), so they do not draw on the global RNG.
    """

    _resume: tuple[int, int] | None = None
    _position: tuple[int, int] = (0, 0)

    def _resumable(self) -> bool:
        return isinstance(self.sampler, ResumableSampler) and self.batch_size is not None

    def __iter__(self):
        if not self._resumable():
            return super().__iter__()
        return _LazyCountingIterator(self)

    def _start(self):
        sampler: ResumableSampler = self.sampler
        skip = 0
        if self._resume is not None:
            epoch, batches = self._resume
            self._resume = None
            if epoch == sampler.epoch:
                skip = batches
        sampler.start = skip * self.batch_size
        if self.generator is not None:
            self.generator.manual_seed(hash((sampler.seed, sampler.epoch)) & 0x7FFF_FFFF_FFFF_FFFF)
        self._position = (sampler.epoch, skip)
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        if not self._resumable():
            return {}
        epoch, batches = self._position
        return {"epoch": epoch, "batches": batches, "batch_size": self.batch_size, "seed": self.sampler.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not state or not self._resumable():
            return
        if state.get("batch_size") != self.batch_size or state.get("seed") != self.sampler.seed:
            say(f"the checkpoint was trained with data.batch_size {state.get('batch_size')} and data.seed "
                 f"{state.get('seed')}, this run uses {self.batch_size} and {self.sampler.seed}: the data order "
                 "differs from an uninterrupted run")
        self._resume = (state["epoch"], state["batches"])


class _LazyCountingIterator:
    def __init__(self, loader: ResumableDataLoader) -> None:
        self.loader, self.iterator = loader, None

    def __iter__(self):
        return self

    def __next__(self):
        if self.iterator is None:
            self.iterator = self.loader._start()
        batch = next(self.iterator)
        epoch, batches = self.loader._position
        self.loader._position = (epoch, batches + 1)
        return batch


# ----------------------------------------------------------------------------------------------------------------
# Atomic checkpoint files


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes local checkpoints beside their target, fsyncs, then renames: a crash leaves the old file or the new.

    (Lightning's own writer stages the file in the system temp folder, which a rename cannot move atomically when
    that folder is on another file system.) Remote paths (s3://, ...) keep Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)  # makes the rename itself durable
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: str | os.PathLike | None) -> list[Path]:
    """Delete temporary checkpoint files that dead processes left in `folder`; returns what was removed."""
    removed = []
    if folder and Path(folder).is_dir():
        for leftover in Path(folder).glob(f".*.*{TMP_SUFFIX}"):
            pid = leftover.name[: -len(TMP_SUFFIX)].rsplit(".", 1)[-1]
            if pid.isdigit() and _alive(int(pid)):
                continue  # still being written
            leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------------------------------
# The checkpoint callback of a run


class EpochCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` whose last.ckpt follows every epoch (every validation), improved or not.

    Lightning 2.6 rewrites last.ckpt only when it also writes a top-k file, so after an epoch that does not improve
    the monitored metric, `--ckpt_path last` would resume from the best epoch and redo the later ones.
    """

    @property
    def state_key(self) -> str:  # checkpoints keep a plain ModelCheckpoint's key (best_or_last reads it)
        return "ModelCheckpoint" + super().state_key[len(type(self).__qualname__):]

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def _save_last_if_missed(self, trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):  # skips if saved at this step
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


# ----------------------------------------------------------------------------------------------------------------
# The callback


class FaultTolerance(Callback):
    """Exact resume (RNG states, epoch-metric sums), step-interval saves, preemption-safe stops, non-finite guard.

    Args:
        every_n_train_steps: also write `last.ckpt` (the checkpoint callback's) every this many optimizer steps,
            whatever the monitored metric; 0 keeps the epoch-end saves only. `--ckpt_path last` resumes mid-epoch
            from it.
        handle_signals: on SIGTERM or SIGINT, finish the current step, save `last.ckpt`, and exit with
            128 + the signal number; a second signal gets the previous handler (Ctrl+C twice stops at once).
        check_finite: stop with an error naming the step when the loss is NaN or infinite, before the update, and
            refuse to write a checkpoint whose weights are not finite. Costs one host sync per step.
    """

    def __init__(self, every_n_train_steps: int = 0, handle_signals: bool = True, check_finite: bool = True) -> None:
        if every_n_train_steps < 0:
            raise ValueError(f"reliability.every_n_train_steps must be >= 0, got {every_n_train_steps}")
        self.every_n_train_steps = every_n_train_steps
        self.handle_signals, self.check_finite = handle_signals, check_finite
        self._trainer = None
        self._loaded: dict[str, Any] | None = None
        self._pending_sums: dict[str, Any] | None = None
        self._signal: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._saved_at: tuple[str, int] | None = None  # (last.ckpt, step) of this callback's latest save
        self._signalled: bool | None = None  # whether any process got a signal, as of this step's loss check

    # -- setup ---------------------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer
        if stage == "fit" and type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:  # the checkpoint callbacks know their folders by now
            for callback in trainer.checkpoint_callbacks:
                for leftover in remove_stale_temporaries(getattr(callback, "dirpath", None)):
                    say(f"removed {leftover}, a partial checkpoint left by a killed run")

    # -- checkpoint state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        state: dict[str, Any] = {"rng": _all_ranks(rng_state())}
        if trainer is not None and trainer.state.fn == "fit":
            state["loaders"] = [loader.state_dict() for loader in _train_loaders(trainer)]
        if trainer is not None and trainer.state.fn == "fit" and _mid_epoch(trainer):
            state["epoch_sums"] = _all_ranks(_epoch_sums(trainer))
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict

    def on_train_start(self, trainer, pl_module) -> None:
        # The last moment before the first batch is drawn: everything that ran since the checkpoint was loaded
        # (model setup, sanity check, iterator creation) may have used the global RNG; the batches must not see it.
        if self._loaded is not None:
            loaded, self._loaded = self._loaded, None
            rank, ranks = trainer.global_rank, loaded.get("rng", [])
            if ranks and len(ranks) != trainer.world_size:
                say(f"the checkpoint comes from {len(ranks)} processes, this run has {trainer.world_size}: "
                     "random streams restart from rank 0's and the run will not repeat the original exactly")
            if ranks:
                set_rng_state(ranks[rank] if rank < len(ranks) else ranks[0])
            # Lightning keeps the loader position too, but hands it back only if the loader is built after the
            # checkpoint is restored; `estimated_stepping_batches` (the one-cycle schedule) builds it before.
            # The loader starts lazily at its first batch, so the position still applies here.
            loaders, positions = _train_loaders(trainer), loaded.get("loaders", [])
            if len(loaders) == len(positions):
                for loader, position in zip(loaders, positions, strict=True):
                    loader.load_state_dict(position)
            sums = loaded.get("epoch_sums")
            if sums and len(sums) == trainer.world_size:  # saved only by a mid-epoch checkpoint
                self._pending_sums = sums[rank]
                _restore_metric_states(pl_module, self._pending_sums.get("metrics", {}))
        if self.handle_signals:
            self._install_signal_handlers()
            if trainer.received_sigterm:  # arrived before this handler was in place
                self._signal = signal.SIGTERM

    # -- per step ------------------------------------------------------------------------------------------------
    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if not self.check_finite:
            return
        # one collective for both questions of the step: a bad loss anywhere, a signal anywhere
        bad, self._signalled = _on_any_rank(trainer, not bool(torch.isfinite(loss.detach()).all()),
                                            self._signal is not None)
        if bad:
            value = loss.detach().float().cpu().item()
            last = _last_checkpoint(trainer)
            kept = (f"the last checkpoint, {last}, is untouched" if last else "no checkpoint had been written yet")
            raise NonFiniteLoss(
                f"error: the training loss is {value} at step {trainer.global_step + 1} (epoch "
                f"{trainer.current_epoch}, batch {trainer.fit_loop.epoch_loop.batch_idx}); training stopped before "
                f"that update and {kept}. Set trainer.gradient_clip_val and resume with --ckpt_path last, or "
                "start again with a lower model.lr")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._pending_sums is not None:
            sums, self._pending_sums = self._pending_sums, None
            _merge_result_sums(trainer, sums.get("tensors", {}))
        step = trainer.global_step
        # once per optimizer step (under gradient accumulation several batches end at the same step), never at
        # step 0 (before any update)
        if (self.every_n_train_steps and step > 0 and step % self.every_n_train_steps == 0
                and (self._saved_at is None or self._saved_at[1] != step)):
            self._saved_at = (_save_last(trainer), step)
        signalled, self._signalled = self._signalled, None
        self._stop_if_signalled(trainer, signalled)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stop_if_signalled(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if not self.check_finite:
            return
        floats = {name: t for name, t in checkpoint.get("state_dict", {}).items()
                  if torch.is_tensor(t) and t.is_floating_point()}
        finite = [torch.isfinite(t).all() for t in floats.values()]
        if not finite or bool(torch.stack([f.to(finite[0].device) for f in finite]).all()):
            return  # one host sync for the whole state dict
        for name, tensor in floats.items():
            if not bool(torch.isfinite(tensor).all()):
                last = _last_checkpoint(trainer)
                kept = f"the last checkpoint, {last}, is untouched" if last else "no checkpoint was written"
                raise NonFiniteLoss(
                    f"error: the weights are not finite after step {trainer.global_step} ({name}); nothing was "
                    f"saved and {kept}. Set trainer.gradient_clip_val and resume with --ckpt_path last, or start "
                    "again with a lower model.lr")

    # -- signals -------------------------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def _on_signal(self, signum: int, frame) -> None:
        self._signal = signum
        say(f"got {signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
             "(send it again to stop without saving)")
        signal.signal(signum, self._previous_handlers.get(signum, signal.SIG_DFL))

    def _stop_if_signalled(self, trainer, signalled: bool | None = None) -> None:
        """Stop if any process got a signal; `signalled` is that answer when this step's check already has it."""
        if not self.handle_signals:
            return
        stop = signalled if signalled is not None else _on_any_rank(trainer, self._signal is not None)[0]
        if not stop:
            return
        signum = self._signal or signal.SIGTERM
        if self._saved_at is not None and self._saved_at[1] == trainer.global_step:
            path = self._saved_at[0]  # this step's save was just written
        else:
            path = _save_last(trainer)
        raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} after step {trainer.global_step}; "
                                  f"saved {path}. Continue with the same command and --ckpt_path last")

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_signal_handlers()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_signal_handlers()


def _on_any_rank(trainer, *flags: bool) -> list[bool]:
    """Each flag, true if it is true on any process: one all-reduce for all of them under DDP."""
    if trainer.world_size == 1:
        return list(flags)
    counts = torch.tensor(flags, dtype=torch.int32, device=trainer.strategy.root_device)
    return [bool(count) for count in trainer.strategy.reduce(counts, reduce_op="sum").tolist()]


def _train_loaders(trainer) -> list[ResumableDataLoader | DeviceLoader]:
    """The training loaders whose position a checkpoint keeps: both start lazily, at their first batch."""
    loaders = trainer.train_dataloader
    flat = list(loaders.values()) if isinstance(loaders, dict) else list(loaders) if isinstance(
        loaders, (list, tuple)) else [loaders]
    return [loader for loader in flat if isinstance(loader, (ResumableDataLoader, DeviceLoader))]


def _mid_epoch(trainer) -> bool:
    done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    return 0 < done < trainer.num_training_batches


def _run_checkpoint(trainer) -> ModelCheckpoint | None:
    """The run's own checkpoint callback (`checkpoint.*`, whose last.ckpt `--ckpt_path last` reads), not another
    ModelCheckpoint a user added beside it: Lightning puts those first in `trainer.checkpoint_callbacks`."""
    callbacks = trainer.checkpoint_callbacks
    return next((c for c in callbacks if isinstance(c, EpochCheckpoint)), callbacks[0] if callbacks else None)


def _last_checkpoint(trainer) -> str | None:
    callback = _run_checkpoint(trainer)
    if callback is not None:
        for path in (callback.last_model_path, callback.best_model_path):
            if path and os.path.isfile(path):
                return path
    return None


def _save_last(trainer) -> str:
    callback = _run_checkpoint(trainer)
    if callback is not None and callback.dirpath:
        path = os.path.join(callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)
        callback.last_model_path = path  # part of the saved state: the resumed run keeps writing this file
    else:
        path = os.path.join(trainer.default_root_dir, "last.ckpt")
    trainer.save_checkpoint(path, weights_only=False)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Epoch-level metric sums (Lightning starts them from zero after a mid-epoch resume)


def _epoch_sums(trainer) -> dict[str, Any]:
    """The running sums of this epoch's `on_epoch` training logs: tensors by result key, metrics by module name."""
    names = {id(module): name for name, module in trainer.lightning_module.named_modules()}
    tensors, metrics = {}, {}
    for key, result in trainer.fit_loop.epoch_loop._results.items():
        if not result.meta.on_epoch:
            continue
        if result.is_tensor:
            entry = {"value": result.value.detach().cpu().clone()}
            if result.meta.is_mean_reduction:
                entry["count"] = result.cumulated_batch_size.detach().cpu().clone()
            tensors[key] = entry
        elif id(result.value) in names:
            metric = result.value
            state = {attr: (value.detach().cpu().clone() if torch.is_tensor(value)
                            else [v.detach().cpu().clone() for v in value])
                     for attr, value in metric.metric_state.items()}
            metrics[names[id(metric)]] = {"state": state, "updates": metric.update_count}
    return {"tensors": tensors, "metrics": metrics}


def _restore_metric_states(pl_module, metrics: dict[str, Any]) -> None:
    modules = dict(pl_module.named_modules())
    for name, saved in metrics.items():
        metric = modules.get(name)
        if metric is None:
            continue
        for attr, value in saved["state"].items():
            current = getattr(metric, attr)
            device = current.device if torch.is_tensor(current) else pl_module.device
            setattr(metric, attr, value.to(device) if torch.is_tensor(value) else [v.to(device) for v in value])
        metric._update_count = saved["updates"]  # torchmetrics has no public setter
        metric._computed = None


def _merge_result_sums(trainer, tensors: dict[str, Any]) -> None:
    """Add the saved sums into Lightning's epoch accumulators after the first resumed batch created them."""
    results = trainer.fit_loop.epoch_loop._results
    for key, saved in tensors.items():
        result = results.get(key)
        if result is None or not result.is_tensor:
            continue
        meta, value = result.meta, saved["value"].to(result.value.device)
        if meta.is_mean_reduction:
            result.value = result.value + value
            result.cumulated_batch_size = result.cumulated_batch_size + saved["count"].to(value.device)
        elif meta.is_sum_reduction:
            result.value = result.value + value
        elif meta.is_max_reduction or meta.is_min_reduction:
            result.value = meta.reduce_fx(result.value, value)


# ----------------------------------------------------------------------------------------------------------------
# Checking a --ckpt_path before use


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load `path` the way Lightning will (weights_only), turning every failure into a one-line CheckpointError."""
    try:
        try:  # mmap: only the headers are read here, the tensors stay on disk
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # a pre-zipfile-format file
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError,
            AttributeError, ImportError, IndexError, KeyError) as err:
        reason = type(err).__name__ + (f": {' '.join(str(err).split())[:160]}" if str(err) else "")
        raise CheckpointError(f"--ckpt_path {path} is not a checkpoint torch can read ({reason}); pass a .ckpt "
                              "written by `convmixer fit`, or last/best") from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"--ckpt_path {path} is not a Lightning checkpoint (it has no state_dict entry; a "
                              "bare model state dict goes in model.pretrained instead); pass a .ckpt written by "
                              "`convmixer fit`")
    return checkpoint


def check_resumable(path: str | os.PathLike, checkpoint: dict[str, Any]) -> None:
    if "optimizer_states" not in checkpoint or "loops" not in checkpoint:
        raise CheckpointError(f"--ckpt_path {path} holds weights only (saved with checkpoint.save_weights_only), so "
                              "training cannot resume from it; evaluate it with test/validate, or load it with "
                              "model.pretrained and start a new fit")


def state_dict_mismatch(saved: Mapping[str, Any], wanted: Mapping[str, Any], n: int = 6) -> str:
    """What keeps `saved` from loading strictly where `wanted` is the state dict: missing and unexpected keys and
    wrong shapes (saved vs wanted), at most `n` of each, in state-dict order; "" when it fits."""
    def short(items: list[str]) -> str:
        return "[" + ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "") + "]"

    missing, unexpected = [k for k in wanted if k not in saved], [k for k in saved if k not in wanted]
    wrong = [f"{k} {tuple(saved[k].shape)} vs {tuple(v.shape)}" for k, v in wanted.items()
             if k in saved and tuple(saved[k].shape) != tuple(v.shape)]
    return "; ".join(f"{label} {short(items)}" for label, items in
                     (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)) if items)


def check_compatible(path: str | os.PathLike, checkpoint: dict[str, Any], model: torch.nn.Module) -> None:
    """Raise a CheckpointError naming the difference if `checkpoint` cannot load into `model` strictly."""
    saved, wanted = checkpoint["state_dict"], model.state_dict()
    head = next((k for k in wanted if k.endswith("head.weight")), None)
    stem = next((k for k in wanted if k.endswith("stem.0.weight")), None)
    if head in saved and saved[head].shape[0] != wanted[head].shape[0]:
        raise CheckpointError(f"--ckpt_path {path} was trained for {saved[head].shape[0]} classes but the data has "
                              f"{wanted[head].shape[0]}; use the data set it was trained on, or start a new fit "
                              "with model.pretrained to fine-tune its weights")
    if stem in saved and saved[stem].shape[1] != wanted[stem].shape[1]:
        raise CheckpointError(f"--ckpt_path {path} expects {saved[stem].shape[1]}-channel images but the data has "
                              f"{wanted[stem].shape[1]}; use the data set it was trained on")
    details = state_dict_mismatch(saved, wanted)
    if details:
        raise CheckpointError(f"--ckpt_path {path} holds a different architecture than the model ({details}); pass "
                              "a checkpoint of this model or drop the model options that differ")


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
        reason = err.strerror or str(err)
        raise CheckpointError(f"{what} {folder} cannot be written ({reason}: {err.filename}); choose another "
                              "--checkpoint.dirpath or --name") from err
