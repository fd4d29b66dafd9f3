"""Stopping safely: SIGTERM/SIGINT save `last.ckpt` after the current step and stop; a non-finite loss stops the
run before its update reaches the weights; a checkpoint with non-finite weights is never written.

A signal that arrives while an epoch's validation runs stops the run after that epoch's end, once Lightning has
logged the epoch's training metrics (it logs them after the `on_train_epoch_end` hooks, so raising there would
lose them)."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from ..checkpoints import RunCheckpoint
from ..console import say


class TrainingStopped(Exception):
    """Training ended early on purpose; `exit_code` is what the command exits with."""

    exit_code = 1


class Interrupted(TrainingStopped):
    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention for "ended by signal N"


class NonFiniteLoss(TrainingStopped):
    """A NaN or infinite loss, or weights, stopped the run."""


def run_checkpoint(trainer) -> RunCheckpoint | None:
    """The run's own checkpoint callback (whose last.ckpt `--ckpt_path last` reads), found by type: Lightning puts
    a user's own ModelCheckpoint before it in `trainer.checkpoint_callbacks`."""
    return next((c for c in trainer.checkpoint_callbacks if isinstance(c, RunCheckpoint)), None)


def _on_any_rank(trainer, *flags: bool) -> list[bool]:
    """Each flag, true if it is true on any process: one all-reduce for all of them under DDP."""
    if trainer.world_size == 1:
        return list(flags)
    counts = torch.tensor(flags, dtype=torch.int32, device=trainer.strategy.root_device)
    return [bool(count) for count in trainer.strategy.reduce(counts, reduce_op="sum").tolist()]


class StopGuard(Callback):
    """Preemption-safe stops and the non-finite guard.

    Args:
        handle_signals: on SIGTERM or SIGINT, finish the current step, save `last.ckpt`, and exit with
            128 + the signal number; a second signal gets the previous handler (Ctrl+C twice stops at once).
        check_finite: stop with an error naming the step when the loss is NaN or infinite, before the update, and
            refuse to write a checkpoint whose weights are not finite. Costs one host sync per step.
    """

    def __init__(self, handle_signals: bool = True, check_finite: bool = True) -> None:
        self.handle_signals, self.check_finite = handle_signals, check_finite
        self._signal: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._signalled: bool | None = None  # whether any process got a signal, as of this step's loss check
        self._stop_after_epoch = False  # a signal came after the epoch's last step: stop when the epoch is logged

    # -- signals -------------------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self._stop_after_epoch = False
        if not self.handle_signals:
            return
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous_handlers[signum] = signal.getsignal(signum)
                signal.signal(signum, self._on_signal)
        if trainer.received_sigterm:  # arrived before this handler was in place
            self._signal = signal.SIGTERM

    def _on_signal(self, signum: int, frame) -> None:
        self._signal = signum
        say(f"got {signal.Signals(signum).name}: saving a checkpoint after this step (or this epoch's validation), "
            "then stopping (send it again to stop without saving)")
        signal.signal(signum, self._previous_handlers.get(signum, signal.SIG_DFL))

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_signal_handlers()
        if self._stop_after_epoch:  # the epoch, its logs and the run's epoch-end checkpoint are complete
            self._stop_after_epoch = False
            self._stop(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_signal_handlers()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        signalled, self._signalled = self._signalled, None
        if not self.handle_signals:
            return
        if signalled is None:  # this step's loss check did not ask already (check_finite off)
            signalled = _on_any_rank(trainer, self._signal is not None)[0]
        if signalled:
            self._stop(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # a signal during the epoch's validation: let Lightning log the epoch's training metrics, then stop
        if self.handle_signals and _on_any_rank(trainer, self._signal is not None)[0]:
            trainer.should_stop = True
            self._stop_after_epoch = True

    def _stop(self, trainer) -> None:
        signum = self._signal or signal.SIGTERM
        if checkpoint := run_checkpoint(trainer):
            path = checkpoint.write_last(trainer)
        else:  # a plain Trainer, without the run's checkpoint callback: last.ckpt in its root folder
            path = os.path.join(trainer.default_root_dir, "last.ckpt")
            trainer.save_checkpoint(path, weights_only=False)
        raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} after step {trainer.global_step}; "
                                  f"saved {path}. Continue with the same command and --ckpt_path last")

    # -- non-finite values ---------------------------------------------------------------------------------------
    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if not self.check_finite:
            return
        # one collective for both questions of the step: a bad loss anywhere, a signal anywhere
        bad, self._signalled = _on_any_rank(trainer, not bool(torch.isfinite(loss.detach()).all()),
                                            self._signal is not None)
        if bad:
            raise NonFiniteLoss(
                f"error: the training loss is {loss.item()} at step {trainer.global_step + 1} (epoch "
                f"{trainer.current_epoch}, batch {trainer.fit_loop.epoch_loop.batch_idx}); training stopped before "
                f"that update and {_kept(trainer, 'had been')}. Set trainer.gradient_clip_val and resume with "
                "--ckpt_path last, or start again with a lower model.lr")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if not self.check_finite:
            return
        floats = {name: t for name, t in checkpoint.get("state_dict", {}).items()
                  if torch.is_tensor(t) and t.is_floating_point()}
        finite = [torch.isfinite(t).all() for t in floats.values()]
        if not finite or bool(torch.stack([f.to(finite[0].device) for f in finite]).all()):
            return  # one host sync for the whole state dict
        name = next(name for name, tensor in floats.items() if not bool(torch.isfinite(tensor).all()))
        raise NonFiniteLoss(
            f"error: the weights are not finite after step {trainer.global_step} ({name}); nothing was saved and "
            f"{_kept(trainer, 'was')}. Set trainer.gradient_clip_val and resume with --ckpt_path last, or start "
            "again with a lower model.lr")


def _kept(trainer, verb: str) -> str:
    checkpoint = run_checkpoint(trainer)
    last = checkpoint.existing_checkpoint() if checkpoint else None
    return f"the last checkpoint, {last}, is untouched" if last else f"no checkpoint {verb} written yet"
