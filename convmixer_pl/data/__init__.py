"""Data: one data module per kind of data set, each in a file of its own; a new data module goes here too.

- `base`: what every data module shares (loaders, samplers, MixUp/CutMix, the resumable training position).
- `augment`: augmentation options (`Augmentation`) and the per-image pipelines.
- `device`: splits held on the training device (CIFAR, small-image folders), augmented there in batches;
  `batched_ops`: RandAugment and ColorJitter for whole batches.
- `images`: which files are images, and reading them.
- `digits` (offline default), `cifar` (CIFAR-10/100), `folders` (image folders, and folders to predict).
"""

from ..preprocessing import DataConfig, DataError
from .augment import CIFAR_SCRIPT, Augmentation
from .base import ImageDataModule
from .cifar import CIFAR_MEAN, CIFAR_STD, CIFARDataModule
from .digits import DigitsDataModule
from .folders import FolderPredictDataModule, ImageFolderDataModule
from .images import read_image

__all__ = ["CIFAR_MEAN", "CIFAR_SCRIPT", "CIFAR_STD", "Augmentation", "CIFARDataModule", "DataConfig", "DataError",
           "DigitsDataModule", "FolderPredictDataModule", "ImageDataModule", "ImageFolderDataModule", "read_image"]
