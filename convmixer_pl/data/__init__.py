"""Data modules, one file per kind of data set (a new one goes here too): `digits` (the offline default), `cifar`
(CIFAR-10/100), `folders` (image folders, and folders to predict). `base`: what they share (loaders, samplers,
MixUp/CutMix, the resumable training position); `augment`: augmentation options and per-image pipelines; `device`:
splits held on the training device and augmented there in batches (`batched_ops`: RandAugment and ColorJitter for
whole batches); `images`: which files are images, and reading them.
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
