"""What every data module shares: loaders, the samplers of each stage, MixUp/CutMix per batch, and the training
position that a checkpoint keeps.

Metadata flows one way. A data module that knows its data exposes its `data_config` (`DataConfig`: image size,
channels, normalisation, evaluation resize and class names) once constructed; the CLI links it into the model, and
checkpoints store it. A module that evaluates without training data (a folder to predict, an image folder without
`train/`) has none and takes the model's in `setup`.

Exact resume (`convmixer_pl.resume`): the training order is `DistributedSampler`'s (data seed, epoch) permutation,
one shard per process; each image's augmentation is seeded by (data seed, epoch, index); the position in the epoch
is the data module's checkpoint state.
"""

from __future__ import annotations

import signal

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, Dataset, Sampler

from ..preprocessing import DataConfig, DataError
from ..resume import EpochSampler, SeededItems, TrainingPosition
from .device import BatchAugment, DeviceLoader


class TensorImageDataset(Dataset):
    """uint8 images (N, C, H, W) in memory, a per-sample transform; `paths`: their files, for the prediction writer."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, transform, paths: list[str] | None = None) -> None:
        self.images, self.targets, self.transform, self.paths = images, targets, transform, paths

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.transform(self.images[index]), int(self.targets[index])


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGINT and SIGTERM to the main process: launchers (timeout, SLURM, systemd, Ctrl+C)
    signal the whole process group, and a worker killed by one would end the run before it saves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class ImageDataModule(L.LightningDataModule):
    """Loader settings shared by every data module (each passes its `**loader` options here).

    A data module calls `_set_data_config` once it knows its data, and sets `augment` for training. One whose splits
    are `TensorImageDataset`s can set `device_pipeline`: its loaders are then `DeviceLoader`s that hold each split on
    the training device and augment whole batches there.
    """

    device_pipeline = False
    augment = None  # an `Augmentation`, for training

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
        self.batch_size, self.num_workers, self.pin_memory, self.seed = batch_size, num_workers, pin_memory, seed
        self.persistent_workers = persistent_workers and num_workers > 0
        self.train_set = self.val_set = self.test_set = None
        self.mixer = None  # MixUp/CutMix on whole training batches (`Augmentation.batch_mixer`), or None
        self._data_config: DataConfig | None = None
        self.position = TrainingPosition()  # where in the epoch training is, for checkpoints

    @property
    def data_config(self) -> DataConfig:
        """The preprocessing and classes of this data; AttributeError until known (the CLI's link keeps the model's)."""
        if self._data_config is None:
            raise AttributeError("data_config")
        return self._data_config

    def _set_data_config(self, config: DataConfig) -> None:
        self._data_config = config
        if self.augment is not None:
            self.mixer = self.augment.batch_mixer(config.num_classes)
            if self.device_pipeline:
                BatchAugment.from_augmentation(self.augment, config)  # refuses what it cannot do, now

    # -- per batch ---------------------------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # on the device and for training batches only: validation and test keep their hard labels (and the model
        # summary's example input, a lone tensor, is not a batch to mix)
        if (self.mixer is not None and self.trainer is not None and self.trainer.training
                and isinstance(batch, (tuple, list)) and len(batch) == 2):
            return self.mixer(*batch)
        return batch

    # -- loaders -----------------------------------------------------------------------------------------------
    def _shard(self) -> tuple[int, int]:
        return (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)

    def _loader(self, dataset: Dataset, sampler: Sampler | None = None, **kwargs) -> DataLoader:
        pin = self.pin_memory if self.pin_memory is not None else (
            self.trainer is not None and self.trainer.strategy.root_device.type == "cuda")
        # each loader has its own generator: creating an iterator draws worker seeds from it, and from the global
        # random stream otherwise, which would then depend on how often (with persistent workers) they are created
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          pin_memory=pin, persistent_workers=self.persistent_workers,
                          worker_init_fn=ignore_stop_signals if self.num_workers else None,
                          generator=torch.Generator().manual_seed(self.seed), **kwargs)

    def _device_loader(self, dataset: TensorImageDataset, train: bool = False) -> DeviceLoader:
        """`data.device_pipeline`'s loader of one split: its uint8 images on the training device, batch-augmented
        for training, normalised for evaluation (evaluation splits are held resized and cropped already)."""
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        replicas, rank = self._shard()
        config = self.data_config
        transform = BatchAugment.from_augmentation(self.augment, config) if train else config.batch_transform()
        return DeviceLoader(dataset.images, dataset.targets, self.batch_size, device, transform,
                            shuffle=train, drop_last=train and len(dataset) > self.batch_size,
                            seed=self.seed, num_replicas=replicas, rank=rank,
                            sampler=None if train else self._eval_sampler(dataset))

    def train_dataloader(self):
        if self.device_pipeline:
            loader = self._device_loader(self.train_set, train=True)
        else:
            replicas, rank = self._shard()
            sampler = EpochSampler(self.train_set, num_replicas=replicas, rank=rank, seed=self.seed)
            loader = self._loader(SeededItems(self.train_set, self.seed), sampler,
                                  drop_last=len(self.train_set) > self.batch_size)
        return self.position.restore(loader, self.batch_size, self.seed, self._shard()[0])

    def _eval_sampler(self, dataset: Dataset) -> Sampler | None:
        """Under DDP, every validation/test sample exactly once, so metrics equal a one-process evaluation (Lightning's
        default pads the last shard with repeats: 359 test images on 2 processes would count one twice). Only for
        plain DDP: sharded strategies (FSDP, DeepSpeed) gather weights in every forward and need the same batch count
        on every rank, so they keep Lightning's padded sampler."""
        trainer = self.trainer
        if (trainer is None or trainer.world_size < 2 or type(trainer.strategy) is not DDPStrategy
                or len(dataset) < trainer.world_size):
            return None
        return UnrepeatedDistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                            shuffle=False)

    def val_dataloader(self):
        if self.device_pipeline:
            return self._device_loader(self.val_set)
        return self._loader(self.val_set, self._eval_sampler(self.val_set))

    def test_dataloader(self):
        if self.device_pipeline:
            return self._device_loader(self.test_set)
        return self._loader(self.test_set, self._eval_sampler(self.test_set))

    def predict_dataloader(self):
        # per image even with device_pipeline: one pass, whose sample indices Lightning tracks for the prediction writer
        return self._loader(self.test_set)

    # -- the training position in checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict:
        return self.position.state_dict(self.trainer, self.batch_size, self.seed)

    def load_state_dict(self, state_dict: dict) -> None:
        self.position.load_state_dict(state_dict)


def split_indices(n: int, sizes: list[int], seed: int) -> list[torch.Tensor]:
    """A seeded partition of range(n) into parts of `sizes`."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return list(torch.split(perm, sizes))


def fraction_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded (rest, held-out) split of range(n) with round(n * fraction) held out (at least one of each)."""
    held_out = min(n - 1, max(1, round(n * fraction)))
    return tuple(split_indices(n, [n - held_out, held_out], seed))
