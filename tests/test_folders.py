"""Image folders: the layouts users have (train/ only, train/ + val/, val/ or test/ alone with a checkpoint),
every format PIL opens, the in-memory device pipeline, and the real CIFAR-10 JPEG tree."""

from __future__ import annotations

import contextlib
import copy
import csv
import os
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from conftest import (
    CIFAR10_CLASSES,
    CIFAR10_JPG_TRAIN_PER_CLASS,
    CONFIGS,
    folder_args,
    run_main,
    write_image_folder,
)
from PIL import Image

from convmixer_pl.callbacks import PredictionWriter
from convmixer_pl.cli import ConvMixerCLI
from convmixer_pl.data import (
    Augmentation,
    DataConfig,
    DataError,
    ImageFolderDataModule,
    read_image,
)
from convmixer_pl.data import images as image_io
from convmixer_pl.data.device import DeviceLoader
from convmixer_pl.data.images import decode_all, find_images
from convmixer_pl.module import ConvMixerClassifier

LOADER = dict(num_workers=0, pin_memory=False, persistent_workers=False)


def _folder(root, **kwargs) -> ImageFolderDataModule:
    return ImageFolderDataModule(root=str(root), **{"image_size": 24, "batch_size": 4, **LOADER, **kwargs})


def test_image_folder_reads_png_and_jpeg_of_any_size(image_folder):
    dm = _folder(image_folder)
    assert (dm.class_names, dm.data_config.num_classes, dm.data_config.in_chans) == (["cat", "dog", "owl"], 3, 3)
    assert dm.data_config.class_names == ("cat", "dog", "owl")
    dm.setup("fit")
    dm.setup("test")
    for dataset in (dm.train_set, dm.val_set, dm.test_set):
        assert len(dataset) == 12
        assert {path.rsplit(".", 1)[1] for path, _ in dataset.samples} == {"png", "jpg", "jpeg"}
        for path, label in dataset.samples:
            assert path.split("/")[-2] == dm.class_names[label]
        for image, _ in dataset:
            assert image.shape == (3, 24, 24) and image.dtype == torch.float32
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 24, 24) and labels.dtype == torch.int64


def test_image_folder_evaluation_is_deterministic_and_normalised(image_folder):
    dm = _folder(image_folder, image_size=16, crop_pct=1.0)
    dm.setup("validate")
    first, second = dm.val_set[0][0], dm.val_set[0][0]
    assert torch.equal(first, second)
    # the cat images are one colour plus noise: the normalised mean of each channel says which colour
    colour = torch.tensor([0.0, 255.0, 40.0]) / 255
    mean, std = torch.tensor(dm.data_config.mean), torch.tensor(dm.data_config.std)
    assert torch.allclose(first.mean(dim=(1, 2)), (colour - mean) / std, atol=0.25)


def test_image_folder_splits_map_classes_by_name(tmp_path, capsys):
    write_image_folder(tmp_path, classes=("cat", "dog", "owl"), splits=("train",))
    write_image_folder(tmp_path, classes=("cat", "owl"), splits=("val",))  # fewer classes: labelled by name
    write_image_folder(tmp_path, classes=("cat", "emu"), splits=("test",))  # a class train/ does not have
    dm = _folder(tmp_path)
    dm.setup("validate")
    assert f"convmixer: {tmp_path / 'val'} has no folder for 1 of the 3 classes: [dog]" in capsys.readouterr().err
    assert {(Path(path).parent.name, label) for path, label in dm.val_set.samples} == {("cat", 0), ("owl", 2)}
    with pytest.raises(DataError) as info:
        dm.setup("test")
    assert str(info.value) == (f"{tmp_path / 'test'} has class folder(s) [emu] that train/ does not: "
                               f"{tmp_path / 'test'} has [cat, emu], train/ [cat, dog, owl]; a class is known by "
                               "its folder's name: rename or remove those folders")


def test_train_only_folder_validates_and_tests_on_a_seeded_held_out_part(tmp_path, capsys):
    root = write_image_folder(tmp_path / "images", splits=("train",))

    def held_out(seed: int, stage: str = "fit") -> ImageFolderDataModule:
        dm = _folder(root, val_fraction=0.25, seed=seed)
        dm.setup(stage)
        return dm

    dm = held_out(seed=0)
    assert capsys.readouterr().err.splitlines() == [
        f"convmixer: no {root / 'val'}: validating on 3 of the 12 images of {root / 'train'}, held out from training "
        "(data.val_fraction 0.25, data.seed 0)"]
    train, val = {path for path, _ in dm.train_set.samples}, {path for path, _ in dm.val_set.samples}
    assert len(train) == 9 and len(val) == 3 and not train & val
    assert train | val == {str(path) for path in root.rglob("*.*")}
    assert held_out(seed=0).val_set.samples == dm.val_set.samples  # seeded: fit, validate and test agree
    assert held_out(seed=1).val_set.samples != dm.val_set.samples
    capsys.readouterr()
    test = held_out(seed=0, stage="test")
    assert test.test_set.samples == dm.val_set.samples  # never trained on
    assert capsys.readouterr().err.splitlines() == [
        f"convmixer: no {root / 'test'} or {root / 'val'}: testing on 3 of the 12 images of {root / 'train'}, held "
        "out from training (data.val_fraction 0.25, data.seed 0)"]


def test_train_and_val_folder_tests_on_val(tmp_path, capsys):
    root = write_image_folder(tmp_path / "images", splits=("train", "val"))  # ImageNet's layout
    dm = _folder(root)
    dm.setup("fit")
    assert len(dm.train_set) == 12 and capsys.readouterr().err == ""  # val/ is there: nothing held out
    dm.setup("test")
    assert capsys.readouterr().err.splitlines() == [f"convmixer: no {root / 'test'}: testing on {root / 'val'} "
                                                    "(12 images)"]
    assert dm.test_set.samples == dm.val_set.samples


def test_val_fraction_zero_validates_on_test_as_cifar_does(tmp_path, capsys):
    root = write_image_folder(tmp_path / "images", splits=("train", "test"))
    dm = _folder(root, val_fraction=0)
    dm.setup("fit")
    assert len(dm.train_set) == 12
    assert capsys.readouterr().err.splitlines() == [f"convmixer: no {root / 'val'} and data.val_fraction 0: "
                                                    f"validating on {root / 'test'} (12 images)"]
    dm.setup("test")
    assert dm.val_set.samples == dm.test_set.samples
    with pytest.raises(DataError, match="data.val_fraction must be in"):
        _folder(root, val_fraction=1.0)


def test_image_folder_roots_that_cannot_be_used(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        _folder(tmp_path / "absent")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="has no train/, val/ or test/ folder"):
        _folder(tmp_path / "flat")
    root = write_image_folder(tmp_path / "images", splits=("val", "test"))
    dm = _folder(root)  # fine to build: validate, test and predict take a trained model
    with pytest.raises(DataError, match=f"{root / 'train'} is missing: fit needs"):
        dm.setup("fit")


STORED = DataConfig(16, mean=(0.3, 0.4, 0.5), std=(0.2, 0.25, 0.3), crop_pct=0.8, interpolation="bicubic",
                    class_names=("owl", "cat", "dog"))  # classes not in sorted order


def _model(**kwargs) -> ConvMixerClassifier:
    """A tiny untrained classifier with the data config a checkpoint stores (`data_config=None`: released weights,
    which store none)."""
    return ConvMixerClassifier(**{"dim": 8, "depth": 1, "kernel_size": 3, "patch_size": 2, "data_config": STORED,
                                  **kwargs})


def _evaluating(dm: ImageFolderDataModule, model: ConvMixerClassifier) -> ImageFolderDataModule:
    """The data module as Lightning hands it the model it evaluates with, before `setup`."""
    dm.trainer = SimpleNamespace(lightning_module=model, world_size=1, global_rank=0)
    return dm


def test_folder_without_train_takes_classes_and_preprocessing_from_the_model(tmp_path, capsys):
    root = write_image_folder(tmp_path / "images", classes=("cat", "owl"), splits=("test",))
    dm = _folder(root)
    assert not hasattr(dm, "data_config")  # so the CLI's link leaves the checkpoint's in the model
    with pytest.raises(AttributeError):
        dm.data_config  # noqa: B018
    model = _model()  # classes not in sorted order, one of them without a folder
    _evaluating(dm, model).setup("test")
    assert capsys.readouterr().err.splitlines() == [
        f"convmixer: {root / 'test'} has no folder for 1 of the 3 classes: [dog]"]
    assert dm.data_config == model.data_config == STORED
    config = dm.data_config
    assert (dm.class_names, config.in_chans, config.image_size, config.mean, config.std, config.crop_pct,
            config.interpolation) == (["owl", "cat", "dog"], 3, 16, (0.3, 0.4, 0.5), (0.2, 0.25, 0.3), 0.8, "bicubic")
    assert {(Path(path).parent.name, label) for path, label in dm.test_set.samples} == {("cat", 1), ("owl", 0)}
    transform = model.eval_transform()  # what `convmixer predict` does to an image
    for (path, _), (image, _) in zip(dm.test_set.samples, dm.test_set, strict=True):
        assert torch.equal(image, transform(read_image(path)))
    dm.setup("validate")
    assert capsys.readouterr().err.splitlines()[-1] == (f"convmixer: no {root / 'val'}: validating on "
                                                        f"{root / 'test'} (8 images)")


def test_folder_without_train_and_a_model_without_class_names(tmp_path, capsys):
    """Released weights: no class names, no normalisation. The sorted class folders are its classes (ImageNet's
    val/ gives timm's class order) and the data module's own options fill in the preprocessing."""
    root = write_image_folder(tmp_path / "images", splits=("val",))
    model = _model(data_config=None, image_size=16, num_classes=3, in_chans=1)
    assert model.data_config is None
    dm = _evaluating(_folder(root, mean=(0.5,), std=(0.25,)), model)
    dm.setup("test")
    assert capsys.readouterr().err.splitlines() == [
        "convmixer: the model stores no preprocessing: evaluating with image_size 16, mean (0.5,), std (0.25,), "
        "crop_pct 0.875, interpolation bilinear (the data.* options, else DataConfig's defaults)",
        f"convmixer: the model stores no class names: its classes 0..2 are the sorted class folders of {root}",
        f"convmixer: no {root / 'test'}: testing on {root / 'val'} (12 images)"]
    assert dm.class_names == ["cat", "dog", "owl"]
    assert all(Path(path).parent.name == dm.class_names[label] for path, label in dm.test_set.samples)
    assert dm.test_set[0][0].shape == (1, 16, 16)  # the model's one channel: read as grey
    assert dm.data_config == DataConfig(16, in_chans=1, mean=(0.5,), std=(0.25,), class_names=("cat", "dog", "owl"))
    with pytest.raises(DataError, match="the model has 5 classes but stores no class names, and .* has 3 class"):
        _evaluating(_folder(root), _model(data_config=None, image_size=16, num_classes=5)).setup("test")


def test_a_model_without_preprocessing_is_told_with_the_values_used(tmp_path, capsys):
    root = write_image_folder(tmp_path / "images", splits=("val",))
    model = _model(data_config=None, image_size=16, num_classes=3)
    dm = _evaluating(_folder(root, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)), model)
    dm.setup("validate")
    said = capsys.readouterr().err.splitlines()[0]
    used = dm.data_config
    assert (used.image_size, used.mean, used.std, used.crop_pct, used.interpolation) == (
        16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 0.875, "bilinear")
    # the model's image size, not data.image_size (24); the options given, and the defaults of those not given
    assert said == ("convmixer: the model stores no preprocessing: evaluating with image_size 16, "
                    "mean (0.5, 0.5, 0.5), std (0.25, 0.25, 0.25), crop_pct 0.875, interpolation bilinear "
                    "(the data.* options, else DataConfig's defaults)")


# -- what a walk of the folders follows ------------------------------------------------------------------------------

def _set_up_in_time(dm: ImageFolderDataModule, stage: str = "fit", pipes: tuple[Path, ...] = (),
                    seconds: float = 300) -> ImageFolderDataModule:
    """`dm.setup(stage)` in a thread, so that a walk that loops or a read that blocks fails the test instead of
    hanging it (the limit is far above the second it takes); a reader blocked on one of `pipes` is released."""
    failed: list[BaseException] = []

    def set_up() -> None:
        try:
            dm.setup(stage)
        except BaseException as err:  # re-raised in the test's thread
            failed.append(err)

    thread = threading.Thread(target=set_up, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for pipe in pipes:  # a writer that opens and closes: a blocked reader gets end-of-file
            with contextlib.suppress(OSError):
                os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"setup({stage!r}) of {dm.root} did not finish in {seconds} s")
    if failed:
        raise failed[0]
    return dm


def _training_samples(root: Path, bad_images: str) -> list[tuple[str, int]]:
    dm = _set_up_in_time(_folder(root, bad_images=bad_images))
    return dm.train_set.samples


@pytest.mark.parametrize("bad_images", ["error", "skip"])
def test_symlink_loops_neither_hang_nor_add_images(tmp_path, bad_images):
    root = write_image_folder(tmp_path / "images", splits=("train", "val"))
    clean = _training_samples(root, bad_images)
    assert len(clean) == 12
    cat = root / "train" / "cat"
    (cat / "to_train").symlink_to(root / "train", target_is_directory=True)  # its parent
    (cat / "to_root").symlink_to(root, target_is_directory=True)
    (cat / "to_itself").symlink_to(".", target_is_directory=True)
    (cat / "nested").mkdir()
    (cat / "nested" / "back_up").symlink_to("../..", target_is_directory=True)
    assert _training_samples(root, bad_images) == clean


@pytest.mark.parametrize("bad_images", ["error", "skip"])
def test_a_link_to_another_class_folder_does_not_relabel_its_images(tmp_path, bad_images):
    root = write_image_folder(tmp_path / "images", splits=("train", "val"))
    clean = _training_samples(root, bad_images)
    (root / "train" / "cat" / "dogs").symlink_to(root / "train" / "dog", target_is_directory=True)
    (root / "train" / "owl" / "dogs").symlink_to("../dog", target_is_directory=True)  # relative, the same folder
    samples = _training_samples(root, bad_images)
    assert samples == clean
    assert {Path(path).parent.name for path, label in samples if label == 1} == {"dog"}  # dog's images: dog only


@pytest.mark.parametrize("bad_images", ["error", "skip"])
def test_a_pipe_named_like_an_image_is_passed_over_without_blocking(tmp_path, bad_images):
    root = write_image_folder(tmp_path / "images", splits=("train", "val"))
    clean = _training_samples(root, bad_images)
    pipe = root / "train" / "cat" / "waiting.png"
    os.mkfifo(pipe)
    dm = _set_up_in_time(_folder(root, bad_images=bad_images), pipes=(pipe,))
    assert dm.train_set.samples == clean
    assert pipe not in find_images(root) and len(find_images(root)) == 24  # a folder to predict passes it too


def test_class_folders_linked_from_outside_the_root_are_followed(tmp_path):
    root = write_image_folder(tmp_path / "images", classes=("cat", "dog"), splits=("train", "val"))
    elsewhere = write_image_folder(tmp_path / "elsewhere", classes=("emu", "cat"), splits=("train",), seed=1)
    (root / "train" / "emu").symlink_to(elsewhere / "train" / "emu", target_is_directory=True)  # a whole class
    (root / "val" / "emu").symlink_to(elsewhere / "train" / "emu", target_is_directory=True)
    (root / "train" / "cat" / "more").symlink_to(elsewhere / "train" / "cat", target_is_directory=True)
    (elsewhere / "train" / "cat" / "loop").symlink_to(".", target_is_directory=True)  # a loop out there
    dm = _set_up_in_time(_folder(root))
    assert dm.class_names == ["cat", "dog", "emu"]
    by_class = {name: sorted(Path(path).relative_to(root / "train").as_posix() for path, label in dm.train_set.samples
                             if label == index) for index, name in enumerate(dm.class_names)}
    emu_files = sorted(path.name for path in (elsewhere / "train" / "emu").iterdir())
    cat_files = sorted(path.name for path in (root / "train" / "cat").iterdir() if path.is_file())
    more_cats = sorted(path.name for path in (elsewhere / "train" / "cat").iterdir() if path.is_file())
    assert by_class["emu"] == [f"emu/{name}" for name in emu_files] and len(emu_files) == 4
    assert by_class["cat"] == sorted([f"cat/{name}" for name in cat_files] + [f"cat/more/{name}" for name in more_cats])
    assert len(by_class["cat"]) == 8 and len(by_class["dog"]) == 4
    assert {Path(path).parent.name for path, _ in dm.val_set.samples} == {"cat", "dog", "emu"}


def test_a_link_outside_the_root_does_not_relabel_another_class(tmp_path):
    root = write_image_folder(tmp_path / "images", classes=("dog",), splits=("train", "val"))
    elsewhere = write_image_folder(tmp_path / "elsewhere", classes=("cat", "emu"), splits=("train",), seed=1)
    for name in ("cat", "emu"):
        (root / "train" / name).symlink_to(elsewhere / "train" / name, target_is_directory=True)
    (elsewhere / "train" / "cat" / "up").symlink_to("..", target_is_directory=True)  # holds emu's folder too
    dm = _set_up_in_time(_folder(root, val_fraction=0))
    assert dm.class_names == ["cat", "dog", "emu"]
    labels_of: dict[str, set[int]] = {}
    for path, label in dm.train_set.samples:
        labels_of.setdefault(os.path.realpath(path), set()).add(label)
    assert len(labels_of) == 12 and all(len(labels) == 1 for labels in labels_of.values())
    assert {Path(path).parent.name for path, label in dm.train_set.samples if label == 2} == {"emu"}


def _copy_splits(source: Path, root: Path, *splits: str) -> Path:
    for split in splits:
        shutil.copytree(source / split, root / split)
    return root


def test_every_folder_layout_trains_and_evaluates_from_the_command(tmp_path, capsys, image_folder, monkeypatch):
    """fit on train/ alone, then test on train/ + val/, validate val/ alone and test test/ alone with the
    checkpoint: `convmixer_pl.cli.main` in this process, as the console script runs it."""
    monkeypatch.chdir(tmp_path)
    run, layouts = tmp_path / "run", {}
    for name, splits in {"train": ["train"], "train_val": ["train", "val"], "val": ["val"], "test": ["test"]}.items():
        layouts[name] = _copy_splits(image_folder, tmp_path / name, *splits)
    code, err = run_main(capsys, "fit", *folder_args(layouts["train"], "--trainer.max_epochs", "1",
                                                     "--data.val_fraction", "0.25", "--checkpoint.dirpath", run))
    assert code == 0, err[-3000:]
    train = layouts["train"]
    assert (f"convmixer: no {train / 'val'}: validating on 3 of the 12 images of {train / 'train'}, held out from "
            "training (data.val_fraction 0.25, data.seed 0)") in err.splitlines()
    checkpoint = ["--ckpt_path", run / "last.ckpt", "--trainer.default_root_dir", tmp_path / "logs"]
    code, err = run_main(capsys, "test", *folder_args(layouts["train_val"], *checkpoint))
    assert code == 0, err[-3000:]
    train_val = layouts["train_val"]
    assert f"convmixer: no {train_val / 'test'}: testing on {train_val / 'val'} (12 images)" in err.splitlines()
    for command, layout in (("validate", "val"), ("test", "test")):
        code, err = run_main(capsys, command, *folder_args(layouts[layout], *checkpoint))
        assert code == 0 and "error" not in err, err[-3000:]


def test_labels_follow_the_checkpoints_class_order(tmp_path, image_folder, monkeypatch):
    """A test/-only root scored with a checkpoint that stores its classes in another order (names and head rows
    permuted together) gives the same loss: images are labelled by their folder's name, not its sorted position."""
    monkeypatch.chdir(tmp_path)  # the run's checkpoints/<name>/ folder
    ConvMixerCLI(args=["fit", *folder_args(image_folder, "--trainer.max_epochs", "3", "--trainer.logger", "false",
                                           "--checkpoint.dirpath", tmp_path / "run")])
    saved = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)

    def variant(name: str, class_names: list[str], rows: list[int]) -> Path:
        checkpoint = copy.deepcopy(saved)
        checkpoint["hyper_parameters"]["data_config"]["class_names"] = class_names
        for key in ("model.head.weight", "model.head.bias"):
            checkpoint["state_dict"][key] = checkpoint["state_dict"][key][rows]
        torch.save(checkpoint, tmp_path / name)
        return tmp_path / name

    test_only = _copy_splits(image_folder, tmp_path / "test_only", "test")

    def loss(checkpoint: Path) -> float:
        cli = ConvMixerCLI(args=["test", *folder_args(test_only, "--ckpt_path", checkpoint, "--trainer.logger",
                                                      "false", "--report.enabled", "false")])
        assert cli.datamodule.class_names == torch.load(checkpoint, weights_only=True)["hyper_parameters"][
            "data_config"]["class_names"]
        return cli.trainer.callback_metrics["test/loss"].item()

    assert saved["hyper_parameters"]["data_config"]["class_names"] == ["cat", "dog", "owl"]
    reference = loss(tmp_path / "run" / "last.ckpt")
    assert loss(variant("permuted.ckpt", ["owl", "cat", "dog"], [2, 0, 1])) == pytest.approx(reference, abs=1e-6)
    # the check can fail: the head permuted without its names scores the same images differently
    assert loss(variant("mislabelled.ckpt", ["cat", "dog", "owl"], [2, 0, 1])) != pytest.approx(reference, abs=1e-3)


def _images_in_every_format(folder: Path, colour: tuple[int, int, int]) -> None:
    """One 24x20 image of `colour` per format: animated GIF and WebP (a second frame of another colour), TIFF
    (plain and LZW), lossless WebP, JPEG named .jfif and .jpe, BMP and PPM."""
    folder.mkdir(parents=True, exist_ok=True)
    first = Image.fromarray(np.full((20, 24, 3), colour, dtype=np.uint8))
    second = Image.fromarray(np.full((20, 24, 3), [255 - c for c in colour], dtype=np.uint8))
    first.save(folder / "animated.gif", save_all=True, append_images=[second], duration=100, loop=0)
    first.save(folder / "animated.webp", save_all=True, append_images=[second], lossless=True)
    first.save(folder / "plain.tif")
    first.save(folder / "lzw.tiff", compression="tiff_lzw")
    first.save(folder / "lossless.webp", lossless=True)
    first.save(folder / "camera.jfif", format="JPEG", quality=95)
    first.save(folder / "old.jpe", format="JPEG", quality=95)
    first.save(folder / "plain.bmp")
    first.save(folder / "plain.ppm")


def test_gif_tiff_webp_and_jfif_folders_train(tmp_path, capsys):
    colours = {"red": (200, 30, 40), "teal": (20, 160, 150)}
    for split in ("train", "val"):
        for name, colour in colours.items():
            _images_in_every_format(tmp_path / "images" / split / name, colour)
    dm = _folder(tmp_path / "images")
    dm.setup("fit")
    suffixes = {".gif", ".webp", ".tif", ".tiff", ".jfif", ".jpe", ".bmp", ".ppm"}
    assert {Path(path).suffix for path, _ in dm.train_set.samples} == suffixes and len(dm.train_set) == 18
    for path, label in dm.train_set.samples:  # an animation's first frame
        pixel = np.asarray(read_image(path))[10, 12].astype(int)
        assert np.abs(pixel - colours[dm.class_names[label]]).max() <= 4, (path, pixel)
    code, err = run_main(capsys, "fit", *folder_args(tmp_path / "images", "--trainer.max_epochs", "1",
                                                     "--checkpoint.dirpath", tmp_path / "run"))
    assert code == 0, err[-3000:]
    assert (tmp_path / "run" / "last.ckpt").is_file()


def test_image_folder_device_pipeline_matches_the_per_image_path(image_folder):
    kwargs = dict(image_size=20, crop_pct=0.875, interpolation="bicubic", batch_size=5,
                  augment=Augmentation(scale=(0.5, 1.0), re_prob=0.5))
    device, per_image = _folder(image_folder, device_pipeline=True, **kwargs), _folder(image_folder, **kwargs)
    for dm in (device, per_image):
        dm.setup("fit")
        dm.setup("test")
    assert device.val_set.images.shape == (12, 3, 20, 20) and device.val_set.images.dtype == torch.uint8
    # evaluation has no randomness: the same tensors as the per-image path (downscaled, bicubic, cropped)
    for name in ("val_dataloader", "test_dataloader"):
        loader = getattr(device, name)()
        assert isinstance(loader, DeviceLoader)
        got, want = list(loader), list(getattr(per_image, name)())
        torch.testing.assert_close(torch.cat([x for x, _ in got]), torch.cat([x for x, _ in want]), atol=1e-6, rtol=0)
        assert torch.equal(torch.cat([y for _, y in got]), torch.cat([y for _, y in want]))
    images, targets = next(iter(device.train_dataloader()))
    assert images.shape == (5, 3, 20, 20) and images.dtype == torch.float32 and targets.dtype == torch.long
    assert device.train_set.paths == [path for path, _ in per_image.train_set.samples]
    assert device.train_set.targets.tolist() == per_image.train_set.targets


def test_fit_and_predict_with_the_image_folder_device_pipeline(tmp_path, capsys):
    root = write_image_folder(tmp_path / "images", splits=("train",))  # the held-out part on the device too
    dm = _folder(root, device_pipeline=True, val_fraction=0.25, batch_size=3, image_size=24)
    model = ConvMixerClassifier(dim=8, depth=1, kernel_size=3, patch_size=4, data_config=dm.data_config)
    quiet = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = L.Trainer(max_epochs=2, enable_checkpointing=False, **quiet)
    trainer.fit(model, datamodule=dm)
    assert isinstance(trainer.train_dataloader, DeviceLoader) and trainer.num_training_batches == 3
    assert trainer.global_step == 6 and "val/acc1" in trainer.callback_metrics
    decoded = f"convmixer: decoding the 9 images of {root / 'train'} into memory at 24 px (0 MiB)"
    assert decoded in capsys.readouterr().err.splitlines()
    writer = PredictionWriter(output=str(tmp_path / "predictions.csv"), top_k=1)
    L.Trainer(callbacks=[writer], **quiet).predict(model, datamodule=dm, return_predictions=False)
    with open(tmp_path / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["path"] for row in rows] == dm.test_set.paths and len(rows) == 3  # the held-out images, by file
    assert [row["target"] for row in rows] == [Path(path).parent.name for path in dm.test_set.paths]


def test_real_cifar10_jpeg_test_split_decodes_into_memory(cifar10_jpg):
    dm = _folder(cifar10_jpg, image_size=32, crop_pct=1.0, device_pipeline=True, batch_size=500)
    assert dm.class_names == CIFAR10_CLASSES  # sorted folder names: CIFAR-10's own label order
    dm.setup("test")
    images, targets = dm.test_set.images, dm.test_set.targets
    assert images.shape == (10000, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.bincount(targets).tolist() == [1000] * 10
    for index in (0, 4321, 9999):  # each file's own pixels (already 32 px: not resized) and its folder's label
        path = dm.test_set.paths[index]
        assert Path(path).parent.name == CIFAR10_CLASSES[targets[index]]
        assert torch.equal(images[index], torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1))
    batch, labels = next(iter(dm.test_dataloader()))
    assert batch.shape == (500, 3, 32, 32) and batch.dtype == torch.float32 and torch.equal(labels, targets[:500])


def test_real_cifar10_tree_fits_with_the_imagefolder_config(cifar10_jpg, tmp_path, convmixer, monkeypatch):
    """As a new user would: the real CIFAR-10 JPEG tree (train/ and test/, no val/) and configs/imagefolder.yaml,
    through the installed command (a small model, one epoch); then `test` of a root with only the real test/."""
    monkeypatch.chdir(tmp_path)  # the run's checkpoints/<name>/ folder, for the in-process `test` too
    fit = convmixer("fit", "--config", CONFIGS / "imagefolder.yaml", "--data.root", cifar10_jpg,
                    "--data.image_size", "32", "--data.batch_size", "30", "--data.num_workers", "0",
                    "--model.dim", "16", "--model.depth", "1", "--model.patch_size", "4", "--trainer.max_epochs", "1",
                    "--trainer.enable_progress_bar", "false", "--plots.enabled", "false", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    per_class = CIFAR10_JPG_TRAIN_PER_CLASS
    assert (f"convmixer: no {cifar10_jpg / 'val'}: validating on {per_class} of the {10 * per_class} images of "
            f"{cifar10_jpg / 'train'}, held out from training (data.val_fraction 0.1, data.seed 0)"
            ) in fit.stderr.splitlines()
    (tmp_path / "test_only").mkdir()
    (tmp_path / "test_only" / "test").symlink_to(cifar10_jpg / "test")
    cli = ConvMixerCLI(args=["test", "--config", str(CONFIGS / "imagefolder.yaml"), "--data.root",
                             str(tmp_path / "test_only"), "--data.num_workers", "0", "--ckpt_path",
                             str(tmp_path / "checkpoints" / "imagefolder" / "last.ckpt"),
                             "--trainer.limit_test_batches", "2", "--trainer.logger", "false",
                             "--report.enabled", "false", "--trainer.enable_progress_bar", "false"])
    assert cli.datamodule.class_names == CIFAR10_CLASSES  # the checkpoint's
    assert cli.datamodule.data_config == cli.model.data_config and cli.model.data_config.image_size == 32
    assert 0 <= cli.trainer.callback_metrics["test/acc1"].item() <= 1


def test_small_images_decode_on_one_thread_and_large_ones_on_several(tmp_path, monkeypatch):
    """Threads only contend on small images (PIL parses their headers under the GIL): decode_all uses one there."""
    workers, real = [], image_io.ThreadPoolExecutor
    monkeypatch.setattr(image_io, "_threads", lambda: 3)
    monkeypatch.setattr(image_io, "ThreadPoolExecutor", lambda max_workers: workers.append(max_workers) or real(
        max_workers=max_workers))
    rng = np.random.default_rng(0)
    for side in (32, 128):
        paths = [str(tmp_path / f"{side}_{i}.png") for i in range(3)]
        for path in paths:
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
        decoded = decode_all(paths, "RGB", lambda image: image[:, :8, :8], "test")
        assert decoded.shape == (3, 3, 8, 8) and torch.equal(decoded[2], torch.from_numpy(
            np.asarray(Image.open(paths[2]))).permute(2, 0, 1)[:, :8, :8])
    assert workers == [1, 3]
