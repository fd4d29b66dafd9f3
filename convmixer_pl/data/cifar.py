"""CIFAR-10 and CIFAR-100 in torchvision's on-disk format."""

from __future__ import annotations

import io
import os
import pickle
from typing import Literal

import numpy as np
import torch
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import check_integrity, download_and_extract_archive

from ..console import say
from ..preprocessing import DataConfig
from .augment import CIFAR_SCRIPT, Augmentation
from .base import DataError, ImageDataModule, TensorImageDataset, fraction_split

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

# file names, keys and checksums of the released archives
RELEASES: dict[str, type[CIFAR10]] = {"cifar10": CIFAR10, "cifar100": CIFAR100}
# what a CIFAR pickle may name: numpy arrays and their dtypes, and the bytes of Python 3 pickles; nothing that runs
SAFE_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "ndarray"),
                ("numpy", "dtype"), ("_codecs", "encode")}


class ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays, and refuses all else: a crafted file runs no code."""

    def find_class(self, module: str, name: str):
        if (module, name) not in SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refused {module}.{name}: a CIFAR file holds only arrays and lists")
        return super().find_class(module, name)


def read_pickle(path: str) -> dict:
    with open(path, "rb") as f:
        entry = ArraysOnly(io.BytesIO(f.read()), encoding="latin1").load()
    if not isinstance(entry, dict):
        raise DataError(f"{path} holds a {type(entry).__name__}, not a CIFAR batch (a dict)")
    return entry


def _label_names(root: str, dataset: str, verify_checksums: bool | None = None) -> list[str]:
    """The class names in the files' meta entry. Before set-up (`verify_checksums` None) the released archives'
    names stand in for a file that is missing or does not read; at set-up such a file is an error naming it."""
    release = RELEASES[dataset]
    path = os.path.join(root, release.base_folder, release.meta["filename"])
    try:
        if verify_checksums and not check_integrity(path, release.meta["md5"]):
            raise DataError("missing, or not the released file (md5 differs)")
        return [str(name) for name in read_pickle(path)[release.meta["key"]]]
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as err:
        if verify_checksums is None:
            return list(CIFAR10_CLASSES if dataset == "cifar10" else CIFAR100_CLASSES)
        hint = ", or data.verify_checksums: false for files that are not the released archives" if verify_checksums \
            else ""
        raise DataError(f"{dataset} not found or corrupted in {os.path.dirname(path)}: {path}: {err}. Point "
                        f"data.root at the folder that holds {release.base_folder}/, or set data.download: "
                        f"true{hint}") from err


class CIFARDataModule(ImageDataModule):
    """CIFAR-10/100 in torchvision's on-disk format (`<root>/cifar-10-batches-py/` or `<root>/cifar-100-python/`).

    Validation is a seeded `val_fraction` split of the training set (CIFAR has none of its own); the official test
    set is the test set. With `val_fraction: 0` all training images train and the test set also serves as
    validation (the official script's setting), said in one line.

    Augmentation defaults are the CIFAR-10 script's (`data.augment.*`): RandomResizedCrop (scale 0.75-1, ratio 1),
    flip, RandAugment (`ra_num_ops` 1, `ra_magnitude` 8), ColorJitter 0.1, RandomErasing 0.25; MixUp/CutMix are off.

    `device_pipeline: true` augments whole batches on the training device (`convmixer_pl.data.device`): no loader
    workers, no per-image Python; a step it cannot do is refused when the module is built. Prediction stays per image.
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
        device_pipeline: bool = False,
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
            device_pipeline: Hold every split on the training device as uint8 and augment whole batches there.
        """
        super().__init__(**loader)
        if dataset not in ("cifar10", "cifar100"):
            raise DataError(f"data.dataset must be 'cifar10' or 'cifar100', got {dataset!r}")
        if not 0 <= val_fraction < 1:
            raise DataError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        self.root, self.dataset, self.download = root, dataset, download
        self.verify_checksums, self.val_fraction = verify_checksums, val_fraction
        self.augment, self.device_pipeline = augment, device_pipeline
        # evaluated whole (crop_pct 1): CIFAR's images are the objects, 32 px square
        self._set_data_config(DataConfig(image_size, mean=CIFAR_MEAN, std=CIFAR_STD, crop_pct=1.0,
                                         class_names=_label_names(root, dataset)))

    def _load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The split's uint8 images (N, 3, 32, 32) and labels; each file's md5 checked first with verify_checksums."""
        release = RELEASES[self.dataset]
        folder = os.path.join(self.root, release.base_folder)
        data, labels = [], []
        for name, md5 in release.train_list if train else release.test_list:
            path = os.path.join(folder, name)
            try:
                if self.verify_checksums and not check_integrity(path, md5):
                    raise DataError("missing, or not the released file (md5 differs)")
                entry = read_pickle(path)
                data.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
            except (OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError, TypeError) as err:
                hint = (", or data.verify_checksums: false for files that are not the released archives (a subset)"
                        if self.verify_checksums and os.path.isdir(folder) else "")
                raise DataError(f"{self.dataset} not found or corrupted in {folder}: {path}: {err}. Point data.root "
                                f"at the folder that holds {release.base_folder}/, or set data.download: true"
                                f"{hint}") from err
        return torch.from_numpy(np.concatenate(data)), torch.tensor(labels)

    def prepare_data(self) -> None:
        release = RELEASES[self.dataset]
        folder = os.path.join(self.root, release.base_folder)
        # once per node, before the ranks read the files; the md5 sums are checked only when downloading
        if self.download and not all(check_integrity(os.path.join(folder, name), md5)
                                     for name, md5 in release.train_list + release.test_list):
            download_and_extract_archive(release.url, self.root, filename=release.filename, md5=release.tgz_md5)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        names = _label_names(self.root, self.dataset, self.verify_checksums)
        if names != list(self.data_config.class_names):
            raise DataError(f"{self.root}: the files name the classes {names[:5]}..., not the "
                            f"{list(self.data_config.class_names)[:5]}... read before they were loaded; point "
                            "data.root at one copy")
        (images, targets), (test_images, test_targets) = self._load(True), self._load(False)
        config = self.data_config
        # evaluation images held at image_size already (a no-op at 32 px), so both pipelines normalise the same
        # uint8 values
        plain = config.batch_transform()
        self.test_set = TensorImageDataset(config.image_transform()(test_images), test_targets, plain)
        augment = self.augment.train_transform(config)
        if self.val_fraction:
            train_idx, val_idx = fraction_split(len(targets), self.val_fraction, self.seed)
            self.train_set = TensorImageDataset(images[train_idx], targets[train_idx], augment)
            self.val_set = TensorImageDataset(config.image_transform()(images[val_idx]), targets[val_idx], plain)
        else:
            self.train_set = TensorImageDataset(images, targets, augment)
            self.val_set = self.test_set
            if stage in ("fit", None):
                say(f"data.val_fraction 0: validating on the {len(test_targets)} test images")
