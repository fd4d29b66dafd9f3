"""Folders of image files: labelled class folders (`ImageFolderDataModule`), and any folder of images to predict
(`FolderPredictDataModule`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import Dataset
from torchvision.datasets.folder import make_dataset
from torchvision.transforms import v2

from ..console import say
from .augment import CROP_AND_FLIP, Augmentation, Interpolation, eval_transform
from .base import DataError, ImageDataModule, TensorImageDataset, fraction_split
from .device import BatchAugment
from .images import decode_all, find_images, is_image_name, read_image, readable, warn_left_out

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SPLITS = ("train", "val", "test")
Samples = list[tuple[str, int]]  # (path, class index)
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # the PIL mode images are read in, by the model's in_chans


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
    held out. Every fallback is said in one line; with neither `val/` nor `test/` nor a held-out part there is
    nothing to evaluate on, which is an error.

    A root without `train/` (only `val/` and/or `test/`) is evaluated with a trained model: `convmixer validate|
    test|predict --ckpt_path X`, or `model.pretrained`. The classes, their order, the channels and the evaluation
    preprocessing are then the model's (its checkpoint's); the images of a class folder get the index of the
    model's class of that name, a folder may hold fewer classes, and a class folder the model does not know is an
    error. A model without class names (a released ImageNet file) takes the folders' sorted names, all of its
    classes. Preprocessing the model does not store comes from this module's options.

    Evaluation resizes to `image_size / crop_pct` with `interpolation` and center-crops. Training augmentation
    (`data.augment.*`) is RandomResizedCrop + flip by default; RandAugment, ColorJitter, RandomErasing and
    MixUp/CutMix switch on with their options (`configs/imagenet_*.yaml` set the paper's values).

    An image is any file PIL can open (`convmixer_pl.data.images`: PNG, JPEG/JFIF, GIF (the first frame of an
    animation), TIFF, WebP, BMP, ...), of any PIL mode, read as 8-bit RGB. `bad_images: error` stops on a
    non-image file (at setup) or an unreadable image (when read), naming it; `skip` decodes every file once at setup
    and leaves the bad ones out with a warning and a count (docs/reliability.md).

    `gpu_pipeline: true` is CIFARDataModule's device-resident pipeline for folders of small images: each split is
    decoded once at setup (in threads) into uint8 at `image_size` (evaluation images resized and center-cropped as
    above, training images to their centre square at `image_size`, from which the batches are cropped), held on
    the training device (N x 3 x image_size^2 bytes per split) and augmented in batches there.
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
        val_fraction: float = 0.1,
        bad_images: Literal["error", "skip"] = "error",
        gpu_pipeline: bool = False,
        **loader,
    ) -> None:
        """
        Args:
            root: The folder that holds train/, val/ and/or test/, each with one folder of images per class.
            image_size: Training and evaluation size.
            crop_pct: Evaluation resize: the short side goes to image_size / crop_pct, then a center crop.
            interpolation: Evaluation resize interpolation.
            augment: Training augmentation.
            mean: Per-channel normalisation mean.
            std: Per-channel normalisation std.
            val_fraction: Without val/: fraction of the train/ images held out (seeded by `seed`) for validation;
                0: train on all of them and validate on test/.
            bad_images: error: stop at a file that is not a readable image; skip: leave such files out, warning.
            gpu_pipeline: Decode every split once into memory, hold it on the training device as uint8 and
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
        self.splits = [split for split in SPLITS if (self.root / split).is_dir()]
        if not self.splits:
            raise DataError(f"{self.root} has no train/, val/ or test/ folder: data.root must hold "
                            "<split>/<class name>/<image> files, train/ to fit and val/ or test/ to evaluate")
        self.augment, self.val_fraction, self.bad_images = augment, val_fraction, bad_images
        self.gpu_pipeline = gpu_pipeline
        self._options = {"image_size": image_size, "mean": tuple(mean), "std": tuple(std), "crop_pct": crop_pct,
                         "interpolation": interpolation}
        self._training_split: tuple[Samples, Samples] | None = None
        if "train" in self.splits:  # the data is known now: the CLI links these into the model
            self._adopt(self._class_folders("train"), 3, self._options, "train/")
            self.mixer = augment.batch_mixer(self.num_classes)
            if gpu_pipeline:
                BatchAugment.from_augmentation(augment, image_size, self.mean, self.std)  # refuses what it can't do
        # else none of them: the CLI's links leave the checkpoint's in the model, and setup adopts the model's

    def _adopt(self, class_names: list[str], in_chans: int, preprocessing: dict, known_as: str) -> None:
        if in_chans not in _MODES:
            raise DataError(f"cannot feed images to a model with in_chans={in_chans}; supported: {sorted(_MODES)}")
        self.class_names, self.num_classes, self.in_chans = list(class_names), len(class_names), in_chans
        self.image_size, self.crop_pct = preprocessing["image_size"], preprocessing["crop_pct"]
        self.interpolation = preprocessing["interpolation"]
        self.mean, self.std = tuple(preprocessing["mean"]), tuple(preprocessing["std"])
        self._index = {name: index for index, name in enumerate(self.class_names)}
        self._known_as = known_as  # whose classes these are, for the errors

    def _adopt_model(self) -> None:
        """A root without train/: the classes, channels and preprocessing of the model being evaluated."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        if model is None or not hasattr(model, "data_config"):
            raise DataError(f"{self.root} has no train/: it can only be evaluated with a trained model "
                            "(convmixer validate|test|predict --ckpt_path FILE, or model.pretrained)")
        config = model.data_config
        stored = {"image_size": config["input_size"][1], "mean": config["mean"], "std": config["std"],
                  "crop_pct": config["crop_pct"], "interpolation": config["interpolation"]}
        if config["mean"] is None:  # released weights: data_config's crop_pct 1 and bilinear are its defaults then
            stored.update(crop_pct=model.hparams.get("crop_pct"), interpolation=model.hparams.get("interpolation"))
        unset = [key for key, value in stored.items() if value is None]
        if unset:
            say("the model stores no " + ", ".join(unset) + ": evaluating with "
                + ", ".join(f"data.{key} {self._options[key]}" for key in unset))
        preprocessing = {key: self._options[key] if value is None else value for key, value in stored.items()}
        names = model.hparams.get("class_names") or self._unnamed_classes(model.num_classes)
        self._adopt(list(names), config["input_size"][0], preprocessing, "the model")

    def _unnamed_classes(self, count: int) -> list[str]:
        """A model without class names (a released file): the sorted class folders, if they are all its classes."""
        classes = sorted({name for split in ("val", "test") if split in self.splits
                          for name in self._class_folders(split)})
        if len(classes) != count:
            raise DataError(f"the model has {count} classes but stores no class names, and {self.root} has "
                            f"{len(classes)} class folders {_listed(classes)}: sorted, folders name its classes only "
                            f"if they are all {count}; evaluate a folder with one folder per class of the model")
        say(f"the model stores no class names: its classes 0..{count - 1} are the sorted class folders of {self.root}")
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
        unknown = [name for name in classes if name not in self._index]
        if unknown:
            raise DataError(f"{folder} has class folder(s) {_listed(unknown)} that {self._known_as} does not: "
                            f"{folder} has {_listed(classes)}, {self._known_as} {_listed(self.class_names)}; "
                            "a class is known by its folder's name: rename or remove those folders")
        missing = [name for name in self.class_names if name not in classes]
        if missing:
            say(f"{folder} has no folder for {len(missing)} of the {self.num_classes} classes: {_listed(missing)}")
        others: list[str] = []  # files that are not named like images (hidden files are ignored)

        def is_image(path: str) -> bool:
            if is_image_name(path):
                return True
            if not os.path.basename(path).startswith("."):
                others.append(path)
            return False

        try:
            samples = make_dataset(str(folder), {name: self._index[name] for name in classes},
                                   is_valid_file=is_image)
        except FileNotFoundError as err:  # a class folder without images
            raise DataError(f"{folder}: {err}") from err
        if self.bad_images == "skip":
            return _drop_unreadable(samples, others, folder, self.class_names)
        if others:  # a file named like an image but unreadable stops training when first read, naming the file
            raise DataError(f"{others[0]} is not an image ({len(others)} such file(s) in {folder}); "
                            "move it out of the data folder, or set data.bad_images: skip")
        return samples

    def _training(self) -> tuple[Samples, Samples]:
        """train/'s images to train on, and those held out from them: a seeded `val_fraction` when there is no
        val/, else none. Listed and split once, so that fit, validate and test agree."""
        if self._training_split is None:
            samples = self._samples("train")
            if "val" in self.splits or not self.val_fraction:
                self._training_split = (samples, [])
            else:
                kept, held = fraction_split(len(samples), self.val_fraction, self.seed)
                self._training_split = ([samples[i] for i in kept], [samples[i] for i in held])
        return self._training_split

    def _evaluation(self, split: str, stage: str | None) -> tuple[Samples, str]:
        """The images that serve as `split` (val or test) and where they are, falling back as the class docstring
        says (in one line)."""
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
            held = self._training()[1]
            neither = f" or {self.root / other}" if split == "test" else ""
            total = len(held) + len(self._training()[0])
            say(f"no {self.root / split}{neither}: {verb} on {len(held)} of the {total} images of "
                f"{self.root / 'train'}, held out from training (data.val_fraction {self.val_fraction}, "
                f"data.seed {self.seed})")
            return held, f"the part of {self.root / 'train'} held out"
        raise DataError(f"{self.root} has neither val/ nor test/ and data.val_fraction is 0: nothing to "
                        f"{goal} on; add {self.root / split}/<class name>/ folders, or set data.val_fraction "
                        "above 0 to hold out part of train/")

    def _dataset(self, samples: Samples, where: str, train: bool = False) -> Dataset:
        mode = _MODES[self.in_chans]
        size, mean, std = self.image_size, self.mean, self.std
        if not self.gpu_pipeline:
            transform = (self.augment.train_transform(size, mean, std) if train
                         else eval_transform(size, mean, std, self.crop_pct, self.interpolation))
            return LabelledImages(samples, transform, mode)
        # decoded once at image_size: evaluation's resize and center crop (the device converts to float and
        # normalises per batch); for training the centre square, which batches are cropped from
        paths = [path for path, _ in samples]
        resize = _resize_and_crop(size, 1.0 if train else self.crop_pct, self.interpolation)
        images = decode_all(paths, mode, resize, where)
        targets = torch.tensor([target for _, target in samples], dtype=torch.long)
        # the per-image path on the decoded copy: what the prediction loader (and a CPU check) use
        transform = self.augment.train_transform(size, mean, std) if train else eval_transform(size, mean, std)
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
            self.train_set = self._dataset(self._training()[0], str(self.root / "train"), train=True)
        if stage in ("fit", "validate", None) and self.val_set is None:
            self.val_set = self._dataset(*self._evaluation("val", stage))
        if stage in ("test", "predict", None) and self.test_set is None:
            self.test_set = self._dataset(*self._evaluation("test", stage))


def _resize_and_crop(size: int, crop_pct: float, interpolation: str):
    """`eval_transform`'s resize (short side to size / crop_pct) and center crop, on uint8 tensors."""
    resize = v2.Resize(int(size / crop_pct), interpolation=v2.InterpolationMode(interpolation), antialias=True)
    crop = v2.CenterCrop(size)

    def apply(image: torch.Tensor) -> torch.Tensor:
        if image.shape[-2:] == (size, size) and int(size / crop_pct) == size:
            return image  # both steps would return it as it is; their overhead is larger than a small decode
        return crop(resize(image))

    return apply


def _drop_unreadable(samples: Samples, others: list[str], folder: Path, names: list[str]) -> Samples:
    """`data.bad_images: skip`: keep the images that decode, warn with a count."""
    problems = readable([path for path, _ in samples])
    kept = [sample for sample, problem in zip(samples, problems, strict=True) if problem is None]
    bad = [problem for problem in problems if problem is not None] + [f"not an image: {p}" for p in others]
    warn_left_out(bad, len(samples) + len(others), folder)
    empty = sorted({names[target] for _, target in samples} - {names[target] for _, target in kept})
    if empty:
        raise DataError(f"{folder}: no readable image in class folder(s) {', '.join(empty)}")
    return kept



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
