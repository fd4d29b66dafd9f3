"""Exact resume: a run stopped at any step and resumed from its checkpoint trains on the same batches, with the
same augmentation and random draws, and logs the same epoch means as a run that never stopped.

Beyond what Lightning's checkpoints hold, that needs:
- each training image's augmentation drawn from a generator seeded by `derive_seed(seed, epoch, index)`
  (`SeededItems`; the on-device pipeline seeds each batch so), whichever loader worker or run draws it;
- the position in the epoch (`TrainingPosition`, in the data module's state), from which torchdata's
  `StatefulDistributedSampler` skips the batches already trained on;
- every process's random-number states (`ResumeState`, a callback), restored just before the first resumed batch;
- every process's running sums of the epoch's training metrics (`save_metric_states`, `load_metric_states`).
The data modules and the LightningModule call these; this module imports neither.
"""

from __future__ import annotations

import hashlib
import random
import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch.utils.data import Dataset
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from .console import say


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on `parts` alone (not on Python's per-process hash salt)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


# -- per-image seeds and the training order -------------------------------------------------------------------------

class EpochSampler(StatefulDistributedSampler):
    """`DistributedSampler`'s order, yielding (epoch, index): `SeededItems` seeds each image's augmentation by it."""

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, index) for index in super().__iter__())


class SeededItems(Dataset):
    """Items `(epoch, index)` of `dataset`, each drawn with torch's generator seeded by (seed, epoch, index) and
    then put back as it was, so augmentation is a function of the image and the epoch alone: the same in every
    worker and after a resume."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        epoch, index = item
        generator = torch.default_generator  # torchvision's transforms draw from it
        state = generator.get_state()
        generator.manual_seed(derive_seed(self.seed, epoch, index))
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)


# -- the position in the epoch --------------------------------------------------------------------------------------

class TrainingPosition:
    """The epoch the next training batch belongs to, how many of its batches were trained on, and the settings that
    make the order (batch size, seed, process count). (Not torchdata's StatefulDataLoader state: it is tied to the
    worker count, and Lightning restores it only into a loader built after the restore, which the one-cycle
    schedule's `estimated_stepping_batches` builds before.)"""

    loader = None  # the training loader whose sampler holds the position
    _restored: dict | None = None  # the position of the checkpoint being resumed from

    def state_dict(self, trainer, batch_size: int, seed: int) -> dict:
        if trainer is None or self.loader is None or trainer.state.fn != "fit":
            return {}
        epoch, batches = self.loader.sampler.epoch, trainer.fit_loop.epoch_loop.batch_progress.current.ready
        if batches >= trainer.num_training_batches:  # that epoch's batches are all trained on: the next one's turn
            epoch, batches = epoch + 1, 0
        return {"epoch": epoch, "batches": batches, "batch_size": batch_size, "seed": seed,
                "world_size": trainer.world_size}

    def load_state_dict(self, state: dict) -> None:
        self._restored = state or None
        if state:  # Lightning cannot tell that the data module resumes the position itself
            warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before the epoch ended",
                                    PossibleUserWarning)

    def restore(self, loader, batch_size: int, seed: int, world_size: int):
        """`loader` (its sampler a `StatefulDistributedSampler`), moved to the position being resumed from, if
        any; remembered for `state_dict`."""
        self.loader = loader
        state, self._restored = self._restored, None
        saved = state and (state.get("batch_size"), state.get("seed"), state.get("world_size"))
        if saved and saved != (batch_size, seed, world_size):
            say(f"the checkpoint was trained with data.batch_size {saved[0]}, data.seed {saved[1]} on {saved[2]} "
                f"process(es); this run uses {batch_size}, {seed} and {world_size}: the resumed epoch starts from "
                "its first batch and the data order differs from an uninterrupted run")
        elif saved:
            loader.sampler.set_epoch(state["epoch"])  # before the first iterator: workers prefetch from it
            loader.sampler.load_state_dict({"yielded": state["batches"] * batch_size})  # skipped once
        return loader


# -- random-number and metric states of every process ---------------------------------------------------------------

def per_process(obj: Any) -> list[Any]:
    """`obj` from every process (one entry outside distributed runs); a collective call under DDP."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered
    return [obj]


def rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch and (if initialised) CUDA generator states, `torch.load`-safe (Fabric's
    own collector keeps numpy's state as an array, which `weights_only` loading refuses)."""
    version, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {"python": random.getstate(), "numpy": (version, key.tolist(), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
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

    _loaded: list[dict[str, Any]] | None = None

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
        set_rng_state(states[trainer.global_rank] if trainer.global_rank < len(states) else states[0])


def save_metric_states(checkpoint: dict[str, Any], trainer, metrics: dict[str, Any]) -> None:
    """Every process's running sums of this epoch's training `metrics` (torchmetrics), so that an epoch resumed
    part-way reports the same means; not in the state_dict, which holds rank 0's alone."""
    if trainer is None or trainer.state.fn != "fit":
        return
    if not 0 < trainer.fit_loop.epoch_loop.batch_progress.current.ready < trainer.num_training_batches:
        return  # not mid-epoch: no running sums to resume
    checkpoint["train_metric_states"] = per_process(
        {name: {k: v.detach().cpu().clone() for k, v in metric.metric_state.items()}
         for name, metric in metrics.items()})


def load_metric_states(checkpoint: dict[str, Any], trainer, metrics: dict[str, Any]) -> None:
    states = checkpoint.get("train_metric_states")
    if not states or len(states) != (trainer.world_size if trainer else 1):
        return
    own = states[trainer.global_rank if trainer else 0]
    for name, metric in metrics.items():
        metric.load_state_dict(own.get(name, {}), strict=False)  # torchmetrics sets the states it finds
