"""Folders of image files: a labelled `train/ val/ test/` tree (`ImageFolderDataModule`), and any folder of images
to predict (`FolderPredictDataModule`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from torch.utils.data import Dataset
from torchvision import datasets

from .augment import CROP_AND_FLIP, Augmentation, Interpolation, eval_transform
from .base import DataError, ImageDataModule
from .images import find_images, is_image_name, read_image, readable, warn_left_out

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageFolderDataModule(ImageDataModule):
    """Any `<root>/{train,val,test}/<class>/<image>` tree; class names come from `train/`.

    Evaluation resizes to `image_size / crop_pct` with `interpolation` and center-crops. Training augmentation
    (`data.augment.*`) is RandomResizedCrop + flip by default; RandAugment, ColorJitter, RandomErasing and
    MixUp/CutMix switch on with their options (`configs/imagenet_*.yaml` set the paper's values).

    An image is any file PIL can open (`convmixer_pl.data.images`), of any PIL mode, read as 8-bit RGB.
    `bad_images: error` stops on a non-image file (at setup) or an unreadable image (when read), naming it;
    `skip` decodes every file once at setup and leaves the bad ones out with a warning and a count
    (docs/reliability.md).
    """

    def __init__(
        self,
        root: str = "data/images",
        image_size: int = 224,
        crop_pct: float = 0.875,
        interpolation: Interpolation = "bilinear",
        augment: Augmentation = CROP_AND_FLIP,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        bad_images: Literal["error", "skip"] = "error",
        **loader,
    ) -> None:
        super().__init__(**loader)
        if bad_images not in ("error", "skip"):
            raise DataError(f"data.bad_images must be 'error' or 'skip', got {bad_images!r}")
        self.bad_images = bad_images
        self.root = Path(root)
        self.image_size, self.crop_pct, self.interpolation = image_size, crop_pct, interpolation
        self.augment = augment
        self.mean, self.std = tuple(mean), tuple(std)
        self.in_chans = 3
        self.class_names = self._classes("train")
        self.num_classes = len(self.class_names)
        self.mixer = augment.batch_mixer(self.num_classes)

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
        others: list[str] = []  # files that are not named like images (hidden files are ignored)

        def is_image(path: str) -> bool:
            if is_image_name(path):
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
        plain = eval_transform(self.image_size, self.mean, self.std, self.crop_pct, self.interpolation)
        if stage in ("fit", None) and self.train_set is None:
            self.train_set = self._folder("train", self.augment.train_transform(self.image_size, self.mean,
                                                                                self.std))
        if stage in ("fit", "validate", None) and self.val_set is None:
            self.val_set = self._folder("val", plain)
        if stage in ("test", "predict", None) and self.test_set is None:
            self.test_set = self._folder("test", plain)


def _drop_unreadable(folder: datasets.ImageFolder, others: list[str]) -> datasets.ImageFolder:
    """`data.bad_images: skip`: keep the images that decode, warn with a count."""
    problems = readable([path for path, _ in folder.samples])
    kept = [sample for sample, problem in zip(folder.samples, problems, strict=True) if problem is None]
    bad = [problem for problem in problems if problem is not None] + [f"not an image: {p}" for p in others]
    warn_left_out(bad, len(folder.samples) + len(others), Path(folder.root))
    empty = sorted(set(folder.classes) - {folder.classes[target] for _, target in kept})
    if empty:
        raise DataError(f"{folder.root}: no readable image in class folder(s) {', '.join(empty)}")
    folder.samples = folder.imgs = kept
    folder.targets = [target for _, target in kept]
    return folder


_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


class ImageFiles(Dataset):
    """Image files of any size and PIL mode, converted to the model's channels; items are (image, index)."""

    def __init__(self, paths: list[Path], in_chans: int, transform) -> None:
        if in_chans not in _MODES:
            raise DataError(f"cannot feed images to a model with in_chans={in_chans}; supported: {sorted(_MODES)}")
        self.paths, self.mode, self.transform = paths, _MODES[in_chans], transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return self.transform(read_image(self.paths[index], self.mode)), index


class FolderPredictDataModule(ImageDataModule):
    """Every image under `root` (nested folders, any size or mode), for `convmixer predict` only.

    It knows nothing of the model: image size, channels and normalisation come from the model it predicts with
    (`ConvMixerClassifier.data_config`, stored in its checkpoint), so no training data is needed.
    `convmixer predict --data <folder>` is short for `--data FolderPredictDataModule --data.root <folder>`.
    """

    def __init__(self, root: str, **loader) -> None:
        super().__init__(**loader)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"data.root {self.root}: no such folder of images to predict")
        self.predict_set: ImageFiles | None = None

    def setup(self, stage: str | None = None) -> None:
        if stage != "predict":
            raise DataError(f"FolderPredictDataModule only predicts (got stage {stage!r}); train and test with a "
                            "labelled data module such as ImageFolderDataModule")
        if self.predict_set is None:
            paths = find_images(self.root)
            if not paths:
                raise DataError(f"{self.root} holds no images: no file in it or its sub-folders is of a format PIL "
                                "opens (.jpg, .png, .gif, .tif, .webp, ...)")
            model = self.trainer.lightning_module
            self.predict_set = ImageFiles(paths, model.data_config["input_size"][0], model.eval_transform())

    def predict_dataloader(self):
        return self._loader(self.predict_set)
