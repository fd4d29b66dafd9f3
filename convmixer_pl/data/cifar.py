"""CIFAR-10 and CIFAR-100 in torchvision's on-disk format."""

from __future__ import annotations

import os
import pickle
from typing import Literal

import torch
from torchvision import datasets

from ..console import say
from .augment import CIFAR_SCRIPT, Augmentation, eval_transform
from .base import DataError, ImageDataModule, TensorImageDataset, fraction_split
from .device import BatchAugment

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
# the label names of the released archives (batches.meta, meta), known before a download
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger "
    "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm").split()


def _cifar_class(dataset: str, verify_checksums: bool) -> type[datasets.CIFAR10]:
    base = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[dataset]
    if verify_checksums:
        return base

    class Unverified(base):  # same files and parser; only the md5 comparison is dropped
        train_list = [[name, None] for name, _ in base.train_list]
        test_list = [[name, None] for name, _ in base.test_list]
        meta = {**base.meta, "md5": None}

    return Unverified


def _label_names(root: str, dataset: str) -> list[str]:
    """The class names in the files' meta entry if they are there, else the released archives' names."""
    cls = _cifar_class(dataset, verify_checksums=False)
    path = os.path.join(root, cls.base_folder, cls.meta["filename"])
    try:
        with open(path, "rb") as f:
            return list(pickle.load(f, encoding="latin1")[cls.meta["key"]])
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError):
        return list(CIFAR10_CLASSES if dataset == "cifar10" else CIFAR100_CLASSES)


class CIFARDataModule(ImageDataModule):
    """CIFAR-10/100 in torchvision's on-disk format (`<root>/cifar-10-batches-py/` or `<root>/cifar-100-python/`).

    Validation is a seeded `val_fraction` split of the training set (CIFAR has no validation set of its own); the
    official test set is the test set. With `val_fraction: 0` the whole training set trains and the test set also
    serves as validation (the official script's setting), said in one line. `ImageFolderDataModule` gives
    `val_fraction` the same meaning for a folder without `val/`.

    Augmentation defaults are the CIFAR-10 script's (`data.augment.*`): RandomResizedCrop (scale 0.75-1, ratio 1),
    flip, RandAugment (`ra_num_ops` 1, `ra_magnitude` 8), ColorJitter 0.1, RandomErasing 0.25; MixUp/CutMix are off.

    `gpu_pipeline: true` holds every split on the training device as uint8 and augments whole batches there
    (`convmixer_pl.data.device`): no loader workers, no per-image Python. An augmentation step the device pipeline
    does not do is refused in one line when the data module is built. Prediction keeps the per-image loader: one
    pass, whose sample indices Lightning tracks for the prediction writer.
    """

    def __init__(
        self,
        root: str = "data",
        dataset: Literal["cifar10", "cifar100"] = "cifar10",
        download: bool = False,
        verify_checksums: bool = True,
        val_fraction: float = 0.1,
        image_size: int = 32,
        augment: Augmentation = CIFAR_SCRIPT,
        gpu_pipeline: bool = False,
        **loader,
    ) -> None:
        """
        Args:
            root: The folder that holds `cifar-10-batches-py/` or `cifar-100-python/`.
            dataset: cifar10 or cifar100.
            download: Download the archive into `root` if it is not there.
            verify_checksums: Compare the files' md5 with the released archives' (false for a subset).
            val_fraction: Fraction of the training images held out (seeded by `seed`) for validation; 0: train on
                all of them and validate on the test set.
            image_size: Training and evaluation size (CIFAR's images are 32 px).
            augment: Training augmentation.
            gpu_pipeline: Hold every split on the training device as uint8 and augment whole batches there.
        """
        super().__init__(**loader)
        if dataset not in ("cifar10", "cifar100"):
            raise DataError(f"data.dataset must be 'cifar10' or 'cifar100', got {dataset!r}")
        if not 0 <= val_fraction < 1:
            raise DataError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        self.root, self.dataset, self.download = root, dataset, download
        self.verify_checksums, self.val_fraction = verify_checksums, val_fraction
        self.image_size, self.augment, self.gpu_pipeline = image_size, augment, gpu_pipeline
        self.class_names = _label_names(root, dataset)
        self.num_classes, self.in_chans = len(self.class_names), 3
        self.mean, self.std = CIFAR_MEAN, CIFAR_STD
        self.mixer = augment.batch_mixer(self.num_classes)
        if gpu_pipeline:
            BatchAugment.from_augmentation(augment, image_size, self.mean, self.std)  # refuses what it cannot do

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
        if list(train.classes) != self.class_names:
            raise DataError(f"{self.root}: the files name the classes {list(train.classes)[:5]}..., not the "
                            f"{self.class_names[:5]}... read before they were loaded; point data.root at one copy")
        images = torch.from_numpy(train.data).permute(0, 3, 1, 2).contiguous()
        targets = torch.tensor(train.targets)
        test_images = torch.from_numpy(test.data).permute(0, 3, 1, 2).contiguous()
        test_targets = torch.tensor(test.targets)
        plain = eval_transform(self.image_size, self.mean, self.std)  # at image_size, as the device pipeline does
        self.test_set = TensorImageDataset(test_images, test_targets, plain)
        augment = self.augment.train_transform(self.image_size, self.mean, self.std)
        if self.val_fraction:
            train_idx, val_idx = fraction_split(len(targets), self.val_fraction, self.seed)
            self.train_set = TensorImageDataset(images[train_idx], targets[train_idx], augment)
            self.val_set = TensorImageDataset(images[val_idx], targets[val_idx], plain)
        else:
            self.train_set = TensorImageDataset(images, targets, augment)
            self.val_set = self.test_set
            if stage in ("fit", None):
                say(f"data.val_fraction 0: validating on the {len(test_targets)} test images")
