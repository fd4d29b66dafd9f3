"""What every data module shares: loaders, the samplers of each stage, MixUp/CutMix per batch, and the training
position that a checkpoint keeps.

Metadata flows one way. A data module that knows its data exposes `num_classes`, `in_chans`, `image_size`,
`class_names`, `mean`, `std` (and `crop_pct`, `interpolation`) as soon as it is constructed; the CLI links them
into the model, and checkpoints store them. A module that evaluates without training data (a folder to predict,
an image folder without `train/`) exposes none of them and takes the model's (`ConvMixerClassifier.data_config`)
in `setup`.

Exact resume: the training order is `DistributedSampler`'s (data seed, epoch) permutation, one shard per process.
Each training image's augmentation draws from a generator seeded by (data seed, epoch, image index), so it does not
depend on which worker process, or which run, loads it. The position in the epoch is then all a resumed run needs:
the data module keeps it in its checkpoint state (`state_dict`) and, on resume, torchdata's
`StatefulDistributedSampler` skips the batches already trained on (see `_resume`).
"""

from __future__ import annotations

import hashlib
import warnings

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader, Dataset, Sampler
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from ..console import say


class DataError(ValueError):
    """Bad data on disk or in the config: the message names the path or key and how to fix it."""


class TensorImageDataset(Dataset):
    """uint8 images (N, C, H, W) held in memory, with a per-sample transform; `paths`, the files they were decoded
    from, if any (the prediction writer names them)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, transform=None,
                 paths: list[str] | None = None) -> None:
        self.images, self.targets, self.transform, self.paths = images, targets, transform, paths

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class EpochSampler(StatefulDistributedSampler):
    """`DistributedSampler`'s order, yielding (epoch, index): the data set seeds each image's augmentation by it."""

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, index) for index in super().__iter__())


class SeededAugmentation(Dataset):
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
        generator.manual_seed(sample_seed(self.seed, epoch, index))
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)


class ImageDataModule(L.LightningDataModule):
    """Loader settings shared by every data module (each passes its `**loader` options here).

    A data module whose splits are `TensorImageDataset`s can set `gpu_pipeline`: its loaders are then
    `DeviceLoader`s (`convmixer_pl.data.device`) that hold each split on the training device and augment whole
    batches there with its `augment`, `image_size`, `mean` and `std`.
    """

    gpu_pipeline = False

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        seed: int = 0,
    ) -> None:
        """
        Args:
            batch_size: Images per batch and process (per GPU under DDP).
            num_workers: Loader worker processes (0: load in the training process).
            pin_memory: Page-locked batches for faster copies to the GPU; None: when training on a GPU.
            persistent_workers: Keep the workers between epochs (with num_workers > 0).
            seed: Seed of the splits, the training order and the augmentation.
        """
        super().__init__()
        if batch_size <= 0:
            raise DataError(f"data.batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.seed = seed
        self.train_set = self.val_set = self.test_set = None
        self.mixer = None  # MixUp/CutMix on whole training batches (`Augmentation.batch_mixer`), or None
        self._train_loader = None  # the loader whose position checkpoints keep
        self._resume_from: dict | None = None  # the position of the checkpoint being resumed from

    # -- per batch ---------------------------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # on the device and for training batches only: validation and test keep their hard labels
        if self.mixer is not None and self.trainer is not None and self.trainer.training:
            return self.mixer(*batch)
        return batch

    # -- loaders -----------------------------------------------------------------------------------------------
    def _shard(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(self, dataset: Dataset, sampler: Sampler | None = None, **kwargs) -> DataLoader:
        pin = self.pin_memory
        if pin is None:
            pin = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        # each loader has its own generator: creating an iterator draws worker seeds from it, and from the global
        # random stream otherwise, which would then depend on how often (with persistent workers) they are created
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          pin_memory=pin, persistent_workers=self.persistent_workers,
                          generator=torch.Generator().manual_seed(self.seed), **kwargs)

    def _device_loader(self, dataset: TensorImageDataset, train: bool = False):
        """`data.gpu_pipeline`'s loader of one split: its uint8 images on the training device, batch-augmented
        for training, resized and normalised for evaluation."""
        from .device import BatchAugment, BatchEval, DeviceLoader  # here: through augment.py it imports this module

        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        replicas, rank = self._shard()
        if train:
            transform = BatchAugment.from_augmentation(self.augment, self.image_size, self.mean, self.std)
        else:
            transform = BatchEval(self.image_size, self.mean, self.std)
        return DeviceLoader(dataset.images, dataset.targets, self.batch_size, device, transform,
                            shuffle=train, drop_last=train and len(dataset) > self.batch_size,
                            seed=self.seed, num_replicas=replicas, rank=rank,
                            sampler=None if train else self._eval_sampler(dataset))

    def train_dataloader(self):
        if self.gpu_pipeline:
            return self._resume(self._device_loader(self.train_set, train=True))
        replicas, rank = self._shard()
        sampler = EpochSampler(self.train_set, num_replicas=replicas, rank=rank, seed=self.seed)
        loader = self._loader(SeededAugmentation(self.train_set, self.seed), sampler,
                              drop_last=len(self.train_set) > self.batch_size)
        return self._resume(loader)

    def _eval_sampler(self, dataset: Dataset) -> Sampler | None:
        """Under DDP, every validation/test sample exactly once, so metrics equal a one-process evaluation.

        Lightning's default pads the last shard with repeats (359 test images on 2 processes would count one twice).
        Only for plain DDP: sharded strategies (FSDP, DeepSpeed) gather weights in every forward and need the same
        batch count on every rank, so they keep Lightning's padded sampler.
        """
        trainer = self.trainer
        if (trainer is None or trainer.world_size < 2 or type(trainer.strategy) is not DDPStrategy
                or len(dataset) < trainer.world_size):
            return None
        return UnrepeatedDistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                            shuffle=False)

    def val_dataloader(self):
        if self.gpu_pipeline:
            return self._device_loader(self.val_set)
        return self._loader(self.val_set, self._eval_sampler(self.val_set))

    def test_dataloader(self):
        if self.gpu_pipeline:
            return self._device_loader(self.test_set)
        return self._loader(self.test_set, self._eval_sampler(self.test_set))

    def predict_dataloader(self):
        # per image even with gpu_pipeline: one pass, whose sample indices Lightning tracks for the prediction writer
        return self._loader(self.test_set)

    # -- the training position in checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The training position: the epoch the next batch belongs to, and how many of its batches were trained on.

        (torchdata's StatefulDataLoader state is tied to the worker count, which it refuses to change on resume,
        and Lightning hands a loader's state back only to a loader built after the restore; the one-cycle schedule
        builds it before, through `estimated_stepping_batches`.)"""
        trainer, loader = self.trainer, self._train_loader
        if trainer is None or loader is None or trainer.state.fn != "fit":
            return {}
        epoch, batches = loader.sampler.epoch, trainer.fit_loop.epoch_loop.batch_progress.current.ready
        if batches >= trainer.num_training_batches:  # that epoch's batches are all trained on: the next one's turn
            epoch, batches = epoch + 1, 0
        return {"epoch": epoch, "batches": batches, "batch_size": self.batch_size, "seed": self.seed,
                "world_size": trainer.world_size}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume_from = state_dict or None
        if state_dict:  # Lightning cannot tell that this data module resumes the position itself
            warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before the epoch ended",
                                    PossibleUserWarning)

    def _resume(self, loader):
        """`loader`, at the position of the checkpoint being resumed from, if any; remembered for `state_dict`."""
        self._train_loader = loader
        state, self._resume_from = self._resume_from, None
        if not state:
            return loader
        saved = (state.get("batch_size"), state.get("seed"), state.get("world_size"))
        if saved != (self.batch_size, self.seed, self._shard()[0]):
            say(f"the checkpoint was trained with data.batch_size {saved[0]}, data.seed {saved[1]} on {saved[2]} "
                f"process(es); this run uses {self.batch_size}, {self.seed} and {self._shard()[0]}: the resumed epoch "
                "starts from its first batch and the data order differs from an uninterrupted run")
            return loader
        loader.sampler.set_epoch(state["epoch"])  # before the first iterator: workers prefetch from it
        loader.sampler.load_state_dict({"yielded": state["batches"] * self.batch_size})  # skipped once
        return loader


def split_indices(n: int, sizes: list[int], seed: int) -> list[torch.Tensor]:
    """A seeded partition of range(n) into parts of `sizes`."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return list(torch.split(perm, sizes))


def fraction_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded (rest, held-out) split of range(n) with round(n * fraction) held out (at least one of each)."""
    held_out = min(n - 1, max(1, round(n * fraction)))
    rest, held = split_indices(n, [n - held_out, held_out], seed)
    return rest, held
