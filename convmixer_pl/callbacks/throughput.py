"""Training throughput in the logs: images per second of each epoch, validation time left out."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.data import extract_batch_size


class ThroughputCallback(L.Callback):
    """Logs `train/images_per_sec` (all processes together) at the end of every training epoch.

    Time runs from the first training batch of the epoch to its end, minus validation; no device
    synchronisation per step (the epoch-end logging waits for the device anyway), so it costs nothing.
    Lightning's `ThroughputMonitor` synchronises CUDA after every batch and needs FLOPs, hence this one.
    """

    _start: float | None = None
    _val_start: float | None = None
    _paused, _images = 0.0, 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start, self._paused, self._images = None, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if self._start is None:  # from the first batch on: worker start-up is not the steps' speed
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._images += extract_batch_size(batch)

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._val_start is not None:
            self._paused += time.perf_counter() - self._val_start
            self._val_start = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._start is None or not self._images:
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - self._start - self._paused
        if seconds > 0:
            rate = self._images * trainer.world_size / seconds
            # every process's estimate of the whole run's rate, averaged over the processes
            pl_module.log("train/images_per_sec", rate, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
