"""Folders of image files: labelled class folders (`ImageFolderDataModule`), and any folder of images to predict
(`FolderPredictDataModule`)."""

from __future__ import annotations

import dataclasses
import os
from functools import cached_property
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Dataset

from ..console import say
from ..preprocessing import DataConfig, Interpolation
from .augment import CROP_AND_FLIP, Augmentation
from .base import DataError, ImageDataModule, TensorImageDataset, fraction_split
from .images import decode_all, find_images, is_image_name, read_image, readable, walk_files

Samples = list[tuple[str, int]]  # (path, class index)


def _listed(names: list[str], limit: int = 20) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return f"[{', '.join(names[:limit])}{more}]"


class LabelledImages(Dataset):
    """Image files and their class indices (`samples`), read as 8-bit `mode` and `transform`ed."""

    def __init__(self, samples: Samples, transform, mode: str = "RGB") -> None:
        self.samples, self.transform, self.mode = samples, transform, mode
        self.targets = [target for _, target in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        return self.transform(read_image(path, self.mode)), target


class ImageFolderDataModule(ImageDataModule):
    """Class folders of images, `<root>/{train,val,test}/<class name>/<image>`, as users have them.

    `fit` needs `train/`, whose sorted class folders are the classes. Validation uses `val/`; without it, a seeded
    `val_fraction` of `train/` held out (CIFARDataModule's meaning), or with `val_fraction: 0` `test/`. `test` and
    `predict` use `test/`; without it `val/` (ImageNet's layout is `train/` + `val/`), else the part of `train/`
    held out. Every fallback is said in one line; with nothing to evaluate on, it is an error.

    A root without `train/` is evaluated with a trained model (`convmixer validate|test|predict --ckpt_path X`, or
    `model.pretrained`), whose classes, channels and evaluation preprocessing it takes: a class folder's images get
    the index of the model's class of that name; a folder may hold fewer classes, but none the model does not know.
    A model that stores neither (a released ImageNet file) takes the sorted folder names, which must be all its
    classes, and this module's preprocessing options.

    Evaluation resizes to `image_size / crop_pct` with `interpolation` and center-crops; training augmentation
    (`data.augment.*`) is RandomResizedCrop + flip unless more is switched on (`configs/imagenet_*.yaml`: the
    paper's). An image is any file PIL can open (PNG, JPEG, GIF's first frame, TIFF, WebP, BMP, ...), of any mode.
    `bad_images: error` stops on a non-image file (at setup) or an unreadable image (when read), naming it; `skip`
    decodes every file once at setup and leaves the bad ones out with a warning and a count (docs/reliability.md).

    `device_pipeline: true`: CIFARDataModule's device-resident pipeline, for folders of small images: each split is
    decoded once at setup (in threads) into uint8 at `image_size` (evaluation images resized and center-cropped,
    training images to their centre square) and held on the training device (N x 3 x image_size^2 bytes).
    """

    def __init__(
        self,
        root: str = "data/images",
        image_size: int = 224,
        crop_pct: float | None = None,
        interpolation: Interpolation | None = None,
        augment: Augmentation = CROP_AND_FLIP,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        val_fraction: float = 0.1,
        bad_images: Literal["error", "skip"] = "error",
        device_pipeline: bool = False,
        **loader,
    ) -> None:
        """
        Args:
            root: The folder that holds train/, val/ and/or test/, each with one folder of images per class.
            image_size: Training and evaluation size.
            crop_pct: Evaluation resize: the short side goes to image_size / crop_pct, then a center crop; None:
                `DataConfig`'s default (0.875).
            interpolation: Evaluation resize interpolation; None: `DataConfig`'s default (bilinear).
            augment: Training augmentation.
            mean: Per-channel normalisation mean; None: `DataConfig`'s default (ImageNet's).
            std: Per-channel normalisation std; None: `DataConfig`'s default (ImageNet's).
            val_fraction: Without val/: fraction of the train/ images held out (seeded by `seed`) for validation;
                0: train on all of them and validate on test/.
            bad_images: error: stop at a file that is not a readable image; skip: leave such files out, warning.
            device_pipeline: Decode every split once into memory, hold it on the training device as uint8 and
                augment whole batches there (folders of small images).
        """
        super().__init__(**loader)
        if bad_images not in ("error", "skip"):
            raise DataError(f"data.bad_images must be 'error' or 'skip', got {bad_images!r}")
        if not 0 <= val_fraction < 1:
            raise DataError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"data.root {self.root} does not exist; point it at a folder with train/ (to fit) "
                            "and val/ or test/ class folders")
        self.splits = [split for split in ("train", "val", "test") if (self.root / split).is_dir()]
        if not self.splits:
            raise DataError(f"{self.root} has no train/, val/ or test/ folder: data.root must hold "
                            "<split>/<class name>/<image> files, train/ to fit and val/ or test/ to evaluate")
        self.augment, self.val_fraction, self.bad_images = augment, val_fraction, bad_images
        self.device_pipeline = device_pipeline
        # what the data config takes from the options; unset ones keep DataConfig's defaults
        options = dict(image_size=image_size, crop_pct=crop_pct, interpolation=interpolation, mean=mean, std=std)
        self._options = {key: value for key, value in options.items() if value is not None}
        if "train" in self.splits:  # the data is known now: the CLI links it into the model
            self._adopt(DataConfig(**self._options, class_names=self._class_folders("train")), "train/")
        # else none: the CLI's link leaves the checkpoint's in the model, and setup adopts the model's

    def _adopt(self, config: DataConfig, known_as: str) -> None:
        self._set_data_config(config)
        self.class_names = list(config.class_names)
        self._index = {name: index for index, name in enumerate(self.class_names)}
        self._known_as = known_as  # whose classes these are, for the errors

    def _adopt_model(self) -> None:
        """A root without train/: the classes, channels and preprocessing of the model being evaluated."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        if model is None or not hasattr(model, "data_config"):
            raise DataError(f"{self.root} has no train/: it can only be evaluated with a trained model "
                            "(convmixer validate|test|predict --ckpt_path FILE, or model.pretrained)")
        config = model.data_config
        if config is None:  # released weights: their architecture, this module's preprocessing options
            size = model.hparams.get("image_size") or self._options["image_size"]
            names = self._unnamed_classes(model.num_classes)
            config = DataConfig(**{**self._options, "image_size": size}, in_chans=model.model.in_chans,
                                class_names=names)
            say(f"the model stores no preprocessing: evaluating with image_size {config.image_size}, mean "
                f"{config.mean}, std {config.std}, crop_pct {config.crop_pct}, interpolation {config.interpolation} "
                "(the data.* options, else DataConfig's defaults)")
            say(f"the model stores no class names: its classes 0..{len(names) - 1} are the sorted class folders of "
                f"{self.root}")
        self._adopt(config, "the model")

    def _unnamed_classes(self, count: int) -> list[str]:
        """A model without class names (a released file): the sorted class folders, if they are all its classes."""
        classes = sorted({name for split in ("val", "test") if split in self.splits
                          for name in self._class_folders(split)})
        if len(classes) != count:
            raise DataError(f"the model has {count} classes but stores no class names, and {self.root} has "
                            f"{len(classes)} class folders {_listed(classes)}: sorted, folders name its classes only "
                            f"if they are all {count}; evaluate a folder with one folder per class of the model")
        return classes

    def _class_folders(self, split: str) -> list[str]:
        folder = self.root / split
        # hidden folders (.ipynb_checkpoints, .Trash) are not classes
        classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and entry.name[0] != ".")
        if not classes:
            raise DataError(f"{folder} holds no class folders; put each class's images in {folder}/<class name>/")
        return classes

    def _samples(self, split: str) -> Samples:
        """The images of `<root>/<split>/<class>/...` (sorted, sub-folders included, as torchvision's ImageFolder
        lists them), each with the index of its folder's name among the classes; `bad_images` applied."""
        folder, classes = self.root / split, self._class_folders(split)
        if unknown := [name for name in classes if name not in self._index]:
            raise DataError(f"{folder} has class folder(s) {_listed(unknown)} that {self._known_as} does not: "
                            f"{folder} has {_listed(classes)}, {self._known_as} {_listed(self.class_names)}; "
                            "a class is known by its folder's name: rename or remove those folders")
        if missing := [name for name in self.class_names if name not in classes]:
            say(f"{folder} has no folder for {len(missing)} of the {len(self.class_names)} classes: "
                f"{_listed(missing)}")
        samples: Samples = []
        others: list[str] = []  # files that are not named like images (hidden files are ignored)
        for name in classes:  # another class's folder, reached through a link, is not this class's
            files = walk_files(folder / name, within=self.root, avoid=[folder / other for other in classes])
            images = [path for path in files if is_image_name(path)]
            if not images:
                raise DataError(f"{folder / name} holds no image; put images in it or remove it")
            samples += [(path, self._index[name]) for path in images]
            others += [path for path in files if not is_image_name(path) and os.path.basename(path)[0] != "."]
        if self.bad_images == "skip":
            return _drop_unreadable(samples, others, folder, self.class_names)
        if others:  # a file named like an image but unreadable stops training when first read, naming the file
            raise DataError(f"{others[0]} is not an image ({len(others)} such file(s) in {folder}); "
                            "move it out of the data folder, or set data.bad_images: skip")
        return samples

    @cached_property
    def _training(self) -> tuple[Samples, Samples]:
        """train/'s images to train on, and those held out from them: a seeded `val_fraction` when there is no
        val/, else none. Listed and split once, so that fit, validate and test agree."""
        samples = self._samples("train")
        if "val" in self.splits or not self.val_fraction:
            return samples, []
        kept, held = fraction_split(len(samples), self.val_fraction, self.seed)
        return [samples[i] for i in kept], [samples[i] for i in held]

    def _evaluation(self, split: str, stage: str | None) -> tuple[Samples, str]:
        """The images that serve as `split` (val or test) and where they are, with the class docstring's fallbacks."""
        if split in self.splits:
            return self._samples(split), str(self.root / split)
        goal = "validate" if split == "val" else "predict" if stage == "predict" else "test"
        verb = {"validate": "validating", "predict": "predicting", "test": "testing"}[goal]
        other = "test" if split == "val" else "val"
        # without val/, some of train/ is held out; listed only when used (train/ can be ImageNet's 1.28M files)
        held_out = "train" in self.splits and "val" not in self.splits and self.val_fraction > 0
        if other in self.splits and (split == "test" or not held_out):
            samples = self._samples(other)
            zero = " and data.val_fraction 0" if split == "val" and "train" in self.splits else ""
            say(f"no {self.root / split}{zero}: {verb} on {self.root / other} ({len(samples)} images)")
            return samples, str(self.root / other)
        if held_out:
            kept, held = self._training
            neither = f" or {self.root / other}" if split == "test" else ""
            say(f"no {self.root / split}{neither}: {verb} on {len(held)} of the {len(kept) + len(held)} images of "
                f"{self.root / 'train'}, held out from training (data.val_fraction {self.val_fraction}, "
                f"data.seed {self.seed})")
            return held, f"the part of {self.root / 'train'} held out"
        raise DataError(f"{self.root} has neither val/ nor test/ and data.val_fraction is 0: nothing to "
                        f"{goal} on; add {self.root / split}/<class name>/ folders, or set data.val_fraction "
                        "above 0 to hold out part of train/")

    def _dataset(self, samples: Samples, where: str, train: bool = False) -> Dataset:
        config = self.data_config
        if not self.device_pipeline:
            transform = self.augment.train_transform(config) if train else config.eval_transform()
            return LabelledImages(samples, transform, config.pil_mode)
        # decoded once at image_size: evaluation's resize and center crop (the device converts to float and
        # normalises per batch); for training the centre square, which batches are cropped from
        paths = [path for path, _ in samples]
        decoded = dataclasses.replace(config, crop_pct=1.0) if train else config
        images = decode_all(paths, config.pil_mode, decoded.image_transform(), where)
        targets = torch.tensor([target for _, target in samples], dtype=torch.long)
        # the per-image path on the decoded copy: what the prediction loader (and a CPU check) use
        transform = self.augment.train_transform(config) if train else config.batch_transform()
        return TensorImageDataset(images, targets, transform, paths)

    def setup(self, stage: str | None = None) -> None:
        if "train" not in self.splits:
            if stage in ("fit", None):
                raise DataError(f"{self.root / 'train'} is missing: fit needs {self.root}/train/<class name>/ "
                                "folders (a root with only val/ or test/ is evaluated with a trained model: "
                                "convmixer validate|test|predict --ckpt_path FILE)")
            if not hasattr(self, "class_names"):
                self._adopt_model()
        if stage in ("fit", None) and self.train_set is None:
            self.train_set = self._dataset(self._training[0], str(self.root / "train"), train=True)
        if stage in ("fit", "validate", None) and self.val_set is None:
            self.val_set = self._dataset(*self._evaluation("val", stage))
        if stage in ("test", "predict", None) and self.test_set is None:
            self.test_set = self._dataset(*self._evaluation("test", stage))


def _drop_unreadable(samples: Samples, others: list[str], folder: Path, names: list[str]) -> Samples:
    """`data.bad_images: skip`: keep the images that decode, warn with a count."""
    problems = readable([path for path, _ in samples])
    kept = [sample for sample, problem in zip(samples, problems, strict=True) if problem is None]
    bad = [problem for problem in problems if problem is not None] + [f"not an image: {p}" for p in others]
    if bad:
        rank_zero_warn(f"data.bad_images skip: left out {len(bad)} of {len(samples) + len(others)} files in {folder} "
                       f"(first: {bad[0]})")
    if empty := sorted({names[target] for _, target in samples} - {names[target] for _, target in kept}):
        raise DataError(f"{folder}: no readable image in class folder(s) {', '.join(empty)}")
    return kept


class ImageFiles(LabelledImages):
    """Image files of any size and PIL mode, converted to the model's channels; items (image, index), no targets."""

    def __init__(self, paths: list[Path], config: DataConfig) -> None:
        super().__init__([(path, index) for index, path in enumerate(paths)], config.eval_transform(), config.pil_mode)
        self.paths, self.targets = paths, None


class FolderPredictDataModule(ImageDataModule):
    """Every image under `root` (nested folders, any size or mode), for `convmixer predict` only:
    `convmixer predict --data FolderPredictDataModule --data.root <folder>`. Image size, channels and normalisation
    come from the model it predicts with (its `data_config`, stored in its checkpoint): no training data is needed."""

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
            if model.data_config is None:
                raise DataError("the model stores no preprocessing (released weights): predict with a checkpoint "
                                "of `convmixer fit`, or with an image folder data module that sets it")
            self.predict_set = ImageFiles(paths, model.data_config)

    def predict_dataloader(self):
        return self._loader(self.predict_set)
