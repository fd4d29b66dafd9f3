"""Data modules: scikit-learn's bundled digits (offline default), CIFAR-10/100 and any ImageFolder tree.

Each module exposes `num_classes`, `in_chans`, `image_size` and `class_names` as soon as it is constructed, so
the CLI can link them into the model before anything is loaded.
"""

from __future__ import annotations

import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets
from torchvision.transforms import v2

from .gpu_data import BatchAugment, BatchEval, DeviceLoader
from .reliability import ResumableDataLoader, ResumableSampler
from .transforms import EraseMode, TrainInterpolation, batch_mixer, eval_transform, train_transform

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DataError(ValueError):
    """Bad data on disk or in the config: the message names the path or key and how to fix it."""


class TensorImageDataset(Dataset):
    """uint8 images (N, C, H, W) held in memory, with a per-sample transform."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, transform=None) -> None:
        self.images, self.targets, self.transform = images, targets, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


class ImageDataModule(L.LightningDataModule):
    """Loader settings shared by every data module. `batch_size` is per process (per GPU under DDP)."""

    num_classes: int
    in_chans: int
    image_size: int
    class_names: list[str]

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise DataError(f"data.batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.seed = seed
        self.train_set = self.val_set = self.test_set = None
        self.augment: dict = {}  # per-image options for `train_transform`, set by modules that augment
        self.mixer = None  # MixUp/CutMix on whole training batches (`batch_mixer`), or None

    def _set_augmentation(self, ra_num_ops: int, ra_magnitude: int, ra_magnitude_bins: int, color_jitter: float,
                          re_prob: float, re_mode: str, mixup_alpha: float, cutmix_alpha: float,
                          mix_switch_prob: float, mix_prob: float, **extra) -> None:
        """Check the augmentation options (a bad one names its `data.` key) and keep them."""
        if ra_num_ops < 0 or ra_magnitude_bins < 2 or not 0 <= ra_magnitude < ra_magnitude_bins:
            raise DataError(f"data.ra_num_ops ({ra_num_ops}) must be >= 0 and data.ra_magnitude ({ra_magnitude}) in "
                            f"[0, data.ra_magnitude_bins - 1 = {ra_magnitude_bins - 1}]")
        if color_jitter < 0:
            raise DataError(f"data.color_jitter must be >= 0, got {color_jitter}")
        if not 0 <= re_prob <= 1 or re_mode not in ("const", "pixel"):
            raise DataError(f"data.re_prob ({re_prob}) must be in [0, 1] and data.re_mode ({re_mode!r}) "
                            "'const' or 'pixel'")
        self.augment = dict(ra_num_ops=ra_num_ops, ra_magnitude=ra_magnitude, ra_magnitude_bins=ra_magnitude_bins,
                            color_jitter=color_jitter, re_prob=re_prob, re_mode=re_mode, **extra)
        try:
            self.mixer = batch_mixer(self.num_classes, mixup_alpha, cutmix_alpha, mix_switch_prob, mix_prob)
        except ValueError as err:
            raise DataError(f"data.{err}") from err

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # on the device and for training batches only: validation and test keep their hard labels
        if self.mixer is not None and self.trainer is not None and self.trainer.training:
            return self.mixer(*batch)
        return batch

    def _loader(self, dataset: Dataset, train: bool = False, sampler: Sampler | None = None) -> DataLoader:
        loader_class, generator = DataLoader, None
        if train:  # a (seed, epoch) order that a checkpoint can resume mid-epoch: see `convmixer_pl.reliability`
            trainer = self.trainer
            replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
            sampler = ResumableSampler(dataset, num_replicas=replicas, rank=rank, seed=self.seed)
            loader_class, generator = ResumableDataLoader, torch.Generator()
        return loader_class(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            generator=generator,
            drop_last=train and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

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

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, sampler=self._eval_sampler(self.val_set))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, sampler=self._eval_sampler(self.test_set))

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)


def _split(n: int, sizes: list[int], seed: int) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return list(torch.split(perm, sizes))


class DigitsDataModule(ImageDataModule):
    """The 1,797 8x8 handwritten digits bundled with scikit-learn, upscaled: trains anywhere, no download."""

    def __init__(
        self,
        image_size: int = 16,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, persistent_workers, seed)
        if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise DataError(f"data.val_fraction ({val_fraction}) and data.test_fraction ({test_fraction}) must be "
                            "in (0, 1) and leave room for training")
        self.image_size = image_size
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.num_classes, self.in_chans = 10, 1
        self.class_names = [str(i) for i in range(10)]
        self.mean, self.std = (0.5,), (0.5,)  # stored in checkpoints for `convmixer predict`

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0  # values 0..16
        images = torch.nn.functional.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False)
        images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        targets = torch.from_numpy(digits.target).long()
        n = len(targets)
        n_val, n_test = round(n * self.val_fraction), round(n * self.test_fraction)
        train_idx, val_idx, test_idx = _split(n, [n - n_val - n_test, n_val, n_test], self.seed)
        to_float = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)])
        self.train_set = TensorImageDataset(images[train_idx], targets[train_idx], to_float)
        self.val_set = TensorImageDataset(images[val_idx], targets[val_idx], to_float)
        self.test_set = TensorImageDataset(images[test_idx], targets[test_idx], to_float)


def _cifar_class(dataset: str, verify_checksums: bool) -> type[datasets.CIFAR10]:
    base = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[dataset]
    if verify_checksums:
        return base

    class Unverified(base):  # same files and parser; only the md5 comparison is dropped
        train_list = [[name, None] for name, _ in base.train_list]
        test_list = [[name, None] for name, _ in base.test_list]
        meta = {**base.meta, "md5": None}

    return Unverified


class CIFARDataModule(ImageDataModule):
    """CIFAR-10/100 in torchvision's on-disk format (`<root>/cifar-10-batches-py/` or `<root>/cifar-100-python/`).

    Validation is a seeded `val_size` split of the training set; the official test set is the test set. With
    `val_size: 0` the whole training set trains and the test set also serves as validation (the official script's
    setting).

    Augmentation defaults are the CIFAR-10 script's: RandomResizedCrop (scale 0.75-1, ratio 1), flip, RandAugment
    (`ra_num_ops` 1, `ra_magnitude` 8), ColorJitter 0.1, RandomErasing 0.25; MixUp/CutMix (`mixup_alpha`,
    `cutmix_alpha`) are off. See `convmixer_pl.transforms` for each option.

    `gpu_pipeline: true` holds every split on the training device as uint8 and does the crop, flip, normalization
    and erasing there in batches (`convmixer_pl.gpu_data`): no loader workers, no per-image Python. RandAugment and
    ColorJitter exist only in the per-image pipeline, so it needs `ra_num_ops: 0` and `color_jitter: 0`. Prediction
    keeps the per-image loader: one pass, whose sample indices Lightning tracks for the prediction writer.
    """

    def __init__(
        self,
        root: str = "data",
        dataset: Literal["cifar10", "cifar100"] = "cifar10",
        download: bool = False,
        verify_checksums: bool = True,
        val_size: int = 5000,
        image_size: int = 32,
        scale: tuple[float, float] = (0.75, 1.0),
        ratio: tuple[float, float] = (1.0, 1.0),
        hflip: float = 0.5,
        ra_num_ops: int = 1,
        ra_magnitude: int = 8,
        ra_magnitude_bins: int = 31,
        color_jitter: float = 0.1,
        re_prob: float = 0.25,
        re_mode: EraseMode = "const",
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_switch_prob: float = 0.5,
        mix_prob: float = 1.0,
        gpu_pipeline: bool = False,
        batch_size: int = 512,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, persistent_workers, seed)
        if dataset not in ("cifar10", "cifar100"):
            raise DataError(f"data.dataset must be 'cifar10' or 'cifar100', got {dataset!r}")
        self.root, self.dataset, self.download = root, dataset, download
        self.verify_checksums, self.val_size = verify_checksums, val_size
        self.image_size, self.scale, self.ratio, self.hflip = image_size, tuple(scale), tuple(ratio), hflip
        self.num_classes, self.in_chans = (10 if dataset == "cifar10" else 100), 3
        self.class_names: list[str] = []
        self.mean, self.std = CIFAR_MEAN, CIFAR_STD  # stored in checkpoints for `convmixer predict`
        self._set_augmentation(ra_num_ops, ra_magnitude, ra_magnitude_bins, color_jitter, re_prob, re_mode,
                               mixup_alpha, cutmix_alpha, mix_switch_prob, mix_prob)
        if gpu_pipeline and (ra_num_ops or color_jitter):
            raise DataError(f"data.gpu_pipeline does crop, flip and erasing on the device; RandAugment "
                            f"(data.ra_num_ops {ra_num_ops}) and ColorJitter (data.color_jitter {color_jitter}) run "
                            "only per image: set both to 0, or data.gpu_pipeline: false")
        self.gpu_pipeline = gpu_pipeline

    def _load(self, train: bool) -> datasets.CIFAR10:
        cls = _cifar_class(self.dataset, self.verify_checksums)
        try:
            return cls(self.root, train=train, download=self.download)
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError) as err:
            # RuntimeError: missing or failing its checksum; the others: a damaged file read with checksums off
            folder = os.path.join(self.root, cls.base_folder)
            hint = (", or data.verify_checksums: false for files that are not the released archives (a subset)"
                    if self.verify_checksums and os.path.isdir(folder) else "")
            raise DataError(f"{self.dataset} not found or corrupted in {folder}: {err}. Point data.root at the "
                            f"folder that holds {cls.base_folder}/, or set data.download: true{hint}") from err

    def prepare_data(self) -> None:
        if self.download:  # once per node, before the ranks read the files
            for train in (True, False):
                self._load(train)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, test = self._load(True), self._load(False)
        self.class_names = list(train.classes)
        images = torch.from_numpy(train.data).permute(0, 3, 1, 2).contiguous()
        targets = torch.tensor(train.targets)
        test_images = torch.from_numpy(test.data).permute(0, 3, 1, 2).contiguous()
        test_targets = torch.tensor(test.targets)
        if not 0 <= self.val_size < len(targets):
            raise DataError(f"data.val_size must be in [0, {len(targets)}), got {self.val_size}")
        train_idx, val_idx = _split(len(targets), [len(targets) - self.val_size, self.val_size], self.seed)
        augment = train_transform(self.image_size, self.mean, self.std, self.scale, self.ratio, self.hflip,
                                  **self.augment)
        plain = eval_transform(self.image_size, self.mean, self.std)  # at image_size, as the device pipeline does
        self.train_set = TensorImageDataset(images[train_idx], targets[train_idx], augment)
        self.test_set = TensorImageDataset(test_images, test_targets, plain)
        self.val_set = (TensorImageDataset(images[val_idx], targets[val_idx], plain) if self.val_size
                        else self.test_set)

    def _device_loader(self, dataset: TensorImageDataset, train: bool = False) -> DeviceLoader:
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if train:
            transform = BatchAugment(self.image_size, self.mean, self.std, self.scale, self.ratio, self.hflip,
                                     erase_prob=self.augment["re_prob"],
                                     erase_value=None if self.augment["re_mode"] == "pixel" else 0.0)
        else:
            transform = BatchEval(self.image_size, self.mean, self.std)
        return DeviceLoader(dataset.images, dataset.targets, self.batch_size, device, transform,
                            shuffle=train, drop_last=train and len(dataset) > self.batch_size,
                            seed=self.seed, num_replicas=replicas, rank=rank,
                            sampler=None if train else self._eval_sampler(dataset))

    def train_dataloader(self):
        return self._device_loader(self.train_set, train=True) if self.gpu_pipeline else super().train_dataloader()

    def val_dataloader(self):
        return self._device_loader(self.val_set) if self.gpu_pipeline else super().val_dataloader()

    def test_dataloader(self):
        return self._device_loader(self.test_set) if self.gpu_pipeline else super().test_dataloader()



def read_image(path: str, mode: str = "RGB") -> Image.Image:
    """Any image PIL reads, upright (EXIF orientation) and as 8-bit `mode` ("RGB" or "L"); a file it cannot read
    raises a DataError naming it.

    Grey, grey+alpha, palette, RGBA and CMYK convert with PIL (alpha is dropped, as torchvision does); 16- and
    32-bit grey ("I;16", "I") scale to 8 bits instead of saturating at 255.
    """
    try:
        with Image.open(path) as image:
            image.load()  # decoded while the file is open: the image outlives the `with`
            ImageOps.exif_transpose(image, in_place=True)  # camera JPEGs: upright as displayed; no copy
            if image.mode.startswith("I"):
                values = np.asarray(image, dtype=np.int64).clip(0, 65535) >> 8
                return Image.fromarray(values.astype(np.uint8)).convert(mode)
            if image.mode == "F":
                return Image.fromarray(np.asarray(image).clip(0, 255).astype(np.uint8)).convert(mode)
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")  # what PIL asks for before dropping a palette's transparency
            return image if image.mode == mode else image.convert(mode)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {path} ({err}); replace or delete it (in an image folder, "
                        "data.bad_images: skip leaves unreadable files out)") from err


def _drop_unreadable(folder: datasets.ImageFolder, others: list[str]) -> datasets.ImageFolder:
    """`data.bad_images: skip`: decode every image once (threads), keep the readable ones, warn with a count."""
    def readable(sample: tuple[str, int]) -> str | None:
        try:
            read_image(sample[0])
            return None
        except DataError as err:
            return str(err).split(";")[0]

    with ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as pool:
        problems = list(pool.map(readable, folder.samples))
    kept = [sample for sample, problem in zip(folder.samples, problems, strict=True) if problem is None]
    bad = [problem for problem in problems if problem is not None] + [f"not an image: {p}" for p in others]
    if bad:
        rank_zero_warn(f"data.bad_images skip: left out {len(bad)} of {len(folder.samples) + len(others)} files in "
                       f"{folder.root} (first: {bad[0]})")
    empty = sorted(set(folder.classes) - {folder.classes[target] for _, target in kept})
    if empty:
        raise DataError(f"{folder.root}: no readable image in class folder(s) {', '.join(empty)}")
    folder.samples = folder.imgs = kept
    folder.targets = [target for _, target in kept]
    return folder


class ImageFolderDataModule(ImageDataModule):
    """Any `<root>/{train,val,test}/<class>/<image>` tree; class names come from `train/`.

    Evaluation resizes to `image_size / crop_pct` with `interpolation` and center-crops. Training augmentation is
    RandomResizedCrop + flip by default; RandAugment, ColorJitter, RandomErasing and MixUp/CutMix switch on with
    their options (see `convmixer_pl.transforms`; `configs/imagenet_*.yaml` set the paper's values).

    Images of any PIL mode are read as 8-bit RGB (`read_image`). `bad_images: error` stops on a non-image file (at
    setup) or an unreadable image (when read), naming it; `skip` decodes every file once at setup and leaves the
    bad ones out with a warning and a count (docs/reliability.md).
    """

    def __init__(
        self,
        root: str = "data/images",
        image_size: int = 224,
        crop_pct: float = 0.875,
        interpolation: Literal["bilinear", "bicubic"] = "bilinear",
        train_interpolation: TrainInterpolation | None = None,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        ra_num_ops: int = 0,
        ra_magnitude: int = 9,
        ra_magnitude_bins: int = 31,
        ra_interpolation: Literal["nearest", "bilinear", "bicubic"] = "nearest",
        color_jitter: float = 0.0,
        re_prob: float = 0.0,
        re_mode: EraseMode = "const",
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_switch_prob: float = 0.5,
        mix_prob: float = 1.0,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        bad_images: Literal["error", "skip"] = "error",
        batch_size: int = 64,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, persistent_workers, seed)
        if bad_images not in ("error", "skip"):
            raise DataError(f"data.bad_images must be 'error' or 'skip', got {bad_images!r}")
        self.bad_images = bad_images  # see `_folder`
        self.root = Path(root)
        self.image_size, self.crop_pct, self.scale, self.ratio, self.hflip = image_size, crop_pct, scale, ratio, hflip
        self.interpolation = v2.InterpolationMode(interpolation)
        self.mean, self.std = tuple(mean), tuple(std)
        self.in_chans = 3
        self.class_names = self._classes("train")
        self.num_classes = len(self.class_names)
        self.train_interpolation = train_interpolation or interpolation
        self._set_augmentation(ra_num_ops, ra_magnitude, ra_magnitude_bins, color_jitter, re_prob, re_mode,
                               mixup_alpha, cutmix_alpha, mix_switch_prob, mix_prob,
                               ra_interpolation=ra_interpolation)

    def _classes(self, split: str) -> list[str]:
        folder = self.root / split
        if not self.root.is_dir():
            raise DataError(f"data.root {self.root} does not exist; point it at a folder with train/ val/ test/")
        if not folder.is_dir():
            raise DataError(f"{folder} is missing: data.root must hold train/, val/ and test/ class folders")
        classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
        if not classes:
            raise DataError(f"{folder} holds no class folders; put each class's images in {folder}/<class name>/")
        return classes

    def _folder(self, split: str, transform) -> datasets.ImageFolder:
        classes = self._classes(split)
        if classes != self.class_names:
            raise DataError(f"{self.root / split} has classes {classes}, but train/ has {self.class_names}; "
                            "every split needs the same class folders")
        others: list[str] = []  # files without an image extension (dot-files are ignored)

        def is_image(path: str) -> bool:
            if datasets.folder.has_file_allowed_extension(path, datasets.folder.IMG_EXTENSIONS):
                return True
            if not os.path.basename(path).startswith("."):
                others.append(path)
            return False

        try:
            folder = datasets.ImageFolder(str(self.root / split), transform=transform, loader=read_image,
                                          is_valid_file=is_image)
        except FileNotFoundError as err:
            raise DataError(f"{self.root / split}: {err}") from err
        if self.bad_images == "error":
            # a file named like an image but unreadable stops training when first read, naming the file
            if others:
                raise DataError(f"{others[0]} is not an image ({len(others)} such file(s) in {self.root / split}); "
                                "move it out of the data folder, or set data.bad_images: skip")
            return folder
        return _drop_unreadable(folder, others)

    def setup(self, stage: str | None = None) -> None:
        mean, std, size, interp = self.mean, self.std, self.image_size, self.interpolation
        if stage in ("fit", None) and self.train_set is None:
            self.train_set = self._folder("train", train_transform(size, mean, std, self.scale, self.ratio,
                                                                   self.hflip, self.train_interpolation,
                                                                   **self.augment))
        plain = eval_transform(size, mean, std, self.crop_pct, interp)
        if stage in ("fit", "validate", None) and self.val_set is None:
            self.val_set = self._folder("val", plain)
        if stage in ("test", "predict", None) and self.test_set is None:
            self.test_set = self._folder("test", plain)
