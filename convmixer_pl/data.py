"""Data modules: scikit-learn's bundled digits (offline default), CIFAR-10/100 and any ImageFolder tree.

Each module exposes `num_classes`, `in_chans`, `image_size` and `class_names` as soon as it is constructed, so
the CLI can link them into the model before anything is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision.transforms import v2

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

    def _loader(self, dataset: Dataset, train: bool = False) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)


def _split(n: int, sizes: list[int], seed: int) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return list(torch.split(perm, sizes))


def train_transform(image_size: int, mean, std, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5,
                    interpolation=v2.InterpolationMode.BILINEAR) -> v2.Compose:
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=scale, ratio=ratio, interpolation=interpolation, antialias=True),
        v2.RandomHorizontalFlip(hflip),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])


def eval_transform(image_size: int, mean, std, crop_pct: float = 1.0,
                   interpolation=v2.InterpolationMode.BILINEAR) -> v2.Compose:
    steps = [v2.ToImage()]
    if crop_pct < 1.0 or interpolation is not None:
        steps += [v2.Resize(int(image_size / crop_pct), interpolation=interpolation, antialias=True),
                  v2.CenterCrop(image_size)]
    return v2.Compose(steps + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


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
        to_float = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize((0.5,), (0.5,))])
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

    def _load(self, train: bool) -> datasets.CIFAR10:
        cls = _cifar_class(self.dataset, self.verify_checksums)
        try:
            return cls(self.root, train=train, download=self.download)
        except RuntimeError as err:
            folder = os.path.join(self.root, cls.base_folder)
            raise DataError(f"{self.dataset} not found or corrupted in {folder}: {err}. Point data.root at the "
                            f"folder that holds {cls.base_folder}/, or set data.download: true") from err

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
        augment = train_transform(self.image_size, CIFAR_MEAN, CIFAR_STD, self.scale, self.ratio, self.hflip)
        plain = eval_transform(self.image_size, CIFAR_MEAN, CIFAR_STD, interpolation=None)
        self.train_set = TensorImageDataset(images[train_idx], targets[train_idx], augment)
        self.test_set = TensorImageDataset(test_images, test_targets, plain)
        self.val_set = (TensorImageDataset(images[val_idx], targets[val_idx], plain) if self.val_size
                        else self.test_set)


class ImageFolderDataModule(ImageDataModule):
    """Any `<root>/{train,val,test}/<class>/<image>` tree; class names come from `train/`."""

    def __init__(
        self,
        root: str = "data/images",
        image_size: int = 224,
        crop_pct: float = 0.875,
        interpolation: Literal["bilinear", "bicubic"] = "bilinear",
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        batch_size: int = 64,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, persistent_workers, seed)
        self.root = Path(root)
        self.image_size, self.crop_pct, self.scale, self.ratio, self.hflip = image_size, crop_pct, scale, ratio, hflip
        self.interpolation = v2.InterpolationMode(interpolation)
        self.mean, self.std = tuple(mean), tuple(std)
        self.in_chans = 3
        self.class_names = self._classes("train")
        self.num_classes = len(self.class_names)

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
        try:
            return datasets.ImageFolder(str(self.root / split), transform=transform)
        except FileNotFoundError as err:
            raise DataError(f"{self.root / split}: {err}") from err

    def setup(self, stage: str | None = None) -> None:
        mean, std, size, interp = self.mean, self.std, self.image_size, self.interpolation
        if stage in ("fit", None) and self.train_set is None:
            self.train_set = self._folder("train", train_transform(size, mean, std, self.scale, self.ratio,
                                                                   self.hflip, interp))
        plain = eval_transform(size, mean, std, self.crop_pct, interp)
        if stage in ("fit", "validate", None) and self.val_set is None:
            self.val_set = self._folder("val", plain)
        if stage in ("test", "predict", None) and self.test_set is None:
            self.test_set = self._folder("test", plain)
