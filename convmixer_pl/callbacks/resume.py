"""Exact resume: every process's random-number states in each checkpoint.

Lightning's checkpoints hold the weights, optimizer, schedulers, loop counters, callback states and the data
module's state (the training loader's position: `convmixer_pl.data.base`), but no random-number states, so a
resumed run would draw other crops, flips and MixUp factors than the run it continues.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from ..console import say


def per_process(obj: Any) -> list[Any]:
    """`obj` from every process (one entry outside distributed runs); a collective call under DDP."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered
    return [obj]


def mid_epoch(trainer) -> bool:
    """Whether some but not all training batches of the current epoch are done."""
    return 0 < trainer.fit_loop.epoch_loop.batch_progress.current.ready < trainer.num_training_batches


def rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch and (if initialised) CUDA generator states, `torch.load`-safe.

    (Fabric's own collector keeps numpy's state as an array, which `weights_only` loading refuses.)"""
    version, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "numpy": (version, key.tolist(), pos, has_gauss, gauss),
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


class ResumeState(Callback):
    """Saves every process's RNG states with each checkpoint and restores them in `on_train_start`, the last hook
    before the first resumed batch is drawn: loading the model, the sanity check and creating the loader iterator
    come after Lightning restores callbacks, and may draw random numbers that the batches must not see."""

    def __init__(self) -> None:
        self._loaded: list[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": per_process(rng_state())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict.get("rng")

    def on_train_start(self, trainer, pl_module) -> None:
        states, self._loaded = self._loaded, None
        if not states:
            return
        if len(states) != trainer.world_size:
            say(f"the checkpoint comes from {len(states)} processes, this run has {trainer.world_size}: random "
                "streams restart from rank 0's and the run will not repeat the original exactly")
        rank = trainer.global_rank
        set_rng_state(states[rank] if rank < len(states) else states[0])
