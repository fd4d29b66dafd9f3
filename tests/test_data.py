"""Data modules on small data in the real formats: CIFAR pickles, image folders (their layouts: test_folders.py),
scikit-learn's digits."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import shlex
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CIFAR10_CLASSES, write_cifar
from PIL import Image
from sklearn.datasets import load_digits
from torchvision.datasets import CIFAR10, CIFAR100

from convmixer_pl.data import (
    CIFAR_MEAN,
    CIFAR_STD,
    CIFARDataModule,
    DataConfig,
    DataError,
    DigitsDataModule,
    read_image,
)
from convmixer_pl.data.cifar import read_pickle

LOADER = dict(num_workers=0, pin_memory=False, persistent_workers=False)
CIFAR = {  # folder, training files, label key, class names, training images in the fixture
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{k}" for k in range(1, 6)], "test_batch", "labels",
                CIFAR10_CLASSES, 100),
    "cifar100": ("cifar-100-python", ["train"], "test", "fine_labels", [f"fine_{c:02d}" for c in range(100)], 200),
}


def _read_cifar(folder, files, label_key):
    """The images (N, 3, 32, 32) and labels of CIFAR pickle files, read here independently of torchvision."""
    images, labels = [], []
    for name in files:
        with open(folder / name, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        images.append(entry["data"].reshape(-1, 3, 32, 32))
        labels += entry[label_key]
    return np.concatenate(images), labels


def _keys(images: torch.Tensor) -> list[bytes]:
    return [image.numpy().tobytes() for image in images]


def _cifar(root, dataset, **kwargs) -> CIFARDataModule:
    kwargs = {"verify_checksums": False, "batch_size": 8, **LOADER, **kwargs}
    return CIFARDataModule(root=str(root), dataset=dataset, **kwargs)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_loads_batches_with_the_right_shapes_labels_and_normalisation(cifar_root, dataset):
    folder, train_files, test_file, label_key, classes, n_train = CIFAR[dataset]
    dm = _cifar(cifar_root, dataset, val_fraction=20 / n_train)
    config = dm.data_config  # known before setup: the CLI links it into the model
    assert (config.num_classes, config.in_chans, config.image_size, config.crop_pct) == (len(classes), 3, 32, 1.0)
    assert (config.mean, config.std, config.class_names) == (CIFAR_MEAN, CIFAR_STD, tuple(classes))
    dm.setup("fit")
    assert dm.data_config == config
    assert (len(dm.train_set), len(dm.val_set)) == (n_train - 20, 20)

    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < len(classes)

    # evaluation images: exactly (pixel / 255 - mean) / std of the file's bytes, in file order, with its labels
    raw, raw_labels = _read_cifar(cifar_root / folder, [test_file], label_key)
    mean, std = torch.tensor(CIFAR_MEAN).view(3, 1, 1), torch.tensor(CIFAR_STD).view(3, 1, 1)
    assert len(dm.test_set) == len(raw)
    batch, batch_labels = next(iter(dm.test_dataloader()))
    expected = (torch.from_numpy(raw[:8]).float() / 255 - mean) / std
    assert torch.allclose(batch, expected, atol=1e-5)
    assert batch_labels.tolist() == raw_labels[:8]


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_validation_split_is_disjoint_complete_and_seeded(cifar_root, dataset):
    folder, train_files, _, label_key, _, n_train = CIFAR[dataset]
    raw, raw_labels = _read_cifar(cifar_root / folder, train_files, label_key)
    label_of = dict(zip(_keys(torch.from_numpy(raw)), raw_labels, strict=True))
    assert len(label_of) == n_train  # the fixture's images are all different, so bytes identify them

    def split(seed):
        dm = _cifar(cifar_root, dataset, val_fraction=30 / n_train, seed=seed)
        dm.setup("fit")
        train, val = _keys(dm.train_set.images), _keys(dm.val_set.images)
        assert dm.train_set.targets.tolist() == [label_of[k] for k in train]  # labels travel with their images
        assert dm.val_set.targets.tolist() == [label_of[k] for k in val]
        return train, val

    train, val = split(seed=0)
    assert len(val) == 30 and not set(train) & set(val)
    assert sorted(train + val) == sorted(label_of)
    assert split(seed=0) == (train, val)
    assert set(split(seed=1)[1]) != set(val)


def test_cifar_val_fraction_zero_validates_on_the_test_set(cifar_root):
    dm = _cifar(cifar_root, "cifar10", val_fraction=0)
    dm.setup("fit")
    assert len(dm.train_set) == 100
    assert dm.val_set is dm.test_set and len(dm.val_set) == 20
    val_images, _ = next(iter(dm.val_dataloader()))
    test_images, _ = next(iter(dm.test_dataloader()))
    assert torch.equal(val_images, test_images)


def test_cifar_val_fraction_out_of_range(cifar_root):
    for fraction in (1.0, -0.1):
        with pytest.raises(DataError, match="data.val_fraction"):
            _cifar(cifar_root, "cifar10", val_fraction=fraction)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_checksums_are_verified_by_default(cifar_root, dataset):
    dm = CIFARDataModule(root=str(cifar_root), dataset=dataset, **LOADER)
    with pytest.raises(DataError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert "\n" not in message
    assert str(cifar_root / CIFAR[dataset][0]) in message
    assert "data.verify_checksums: false" in message  # the way to use files that are not the released ones


def test_cifar_missing_folder_names_it(tmp_path):
    dm = _cifar(tmp_path / "nowhere", "cifar10")
    with pytest.raises(DataError, match="cifar-10-batches-py") as info:
        dm.setup("fit")
    assert "\n" not in str(info.value)


class RunsCommand:
    """Unpickled by `pickle.load`, this runs `touch marker`: what a crafted CIFAR file can hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _plant(path: Path, marker: Path) -> None:
    """Replace the CIFAR file at `path` by one of the same layout whose payload runs a command when unpickled."""
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    key = next(k for k in ("label_names", "fine_label_names", "data") if k in entry)
    entry[key] = RunsCommand(marker)
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def _as_released(monkeypatch, dataset: str, folder: Path) -> None:
    """Make the files now in `folder` the "released" ones: the md5 sums that verify_checksums compares with."""
    release = {"cifar10": CIFAR10, "cifar100": CIFAR100}[dataset]

    def md5(name: str) -> str:
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    for attribute in ("train_list", "test_list"):
        monkeypatch.setattr(release, attribute, [[name, md5(name)] for name, _ in getattr(release, attribute)])
    monkeypatch.setattr(release, "meta", {**release.meta, "md5": md5(release.meta["filename"])})


# per data set: its label-name file, a training file and the test file
CIFAR_FILES = {"cifar10": ("batches.meta", "data_batch_3", "test_batch"), "cifar100": ("meta", "train", "test")}


@pytest.mark.parametrize("dataset, name", [(d, name) for d, names in CIFAR_FILES.items() for name in names])
def test_a_cifar_file_that_would_run_code_never_runs_it(tmp_path, monkeypatch, dataset, name):
    folder = write_cifar(tmp_path, dataset, per_class=1)
    _as_released(monkeypatch, dataset, folder)  # verify_checksums true passes the other files
    marker = tmp_path / "ran"
    _plant(folder / name, marker)
    for verify in (True, False):
        dm = _cifar(tmp_path, dataset, verify_checksums=verify)
        for stage in ("fit", "test", "predict"):
            with contextlib.suppress(DataError):
                dm.setup(stage)
        assert not marker.exists(), verify
    # the test can fail: the same file read by plain pickle runs the command
    with open(folder / name, "rb") as f:
        pickle.load(f, encoding="latin1")
    assert marker.exists()


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("dataset, name", [(d, name) for d, names in CIFAR_FILES.items() for name in names])
def test_setup_stops_at_a_cifar_file_that_would_run_code_in_one_line_naming_it(tmp_path, monkeypatch, dataset, name,
                                                                               verify):
    folder = write_cifar(tmp_path, dataset, per_class=1)
    _as_released(monkeypatch, dataset, folder)  # the untouched files pass verify_checksums: the planted one stops it
    _cifar(tmp_path, dataset, verify_checksums=True).setup("fit")
    _plant(folder / name, tmp_path / "ran")
    dm = _cifar(tmp_path, dataset, verify_checksums=verify)
    with pytest.raises(DataError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert f"{folder / name}: " in message and "\n" not in message
    assert ("md5 differs" if verify else f"refused {os.system.__module__}.system") in message
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_arrays_only_reader_reads_the_real_format_as_pickle_does(cifar_root, tmp_path, dataset):
    """The fixture's files are pickled as the released archives are; the released files name numpy's
    reconstructor by its numpy 1 module, `numpy.core.multiarray`: both spellings read."""
    folder, respelled = cifar_root / CIFAR[dataset][0], 0
    for path in sorted(folder.iterdir()):
        with open(path, "rb") as f:
            expected = pickle.load(f, encoding="latin1")
        original = path.read_bytes()
        numpy1 = original.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        respelled += numpy1 != original
        for raw in (original, numpy1):
            (tmp_path / path.name).write_bytes(raw)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2's alias of numpy 1's module
                entry = read_pickle(str(tmp_path / path.name))
            assert entry.keys() == expected.keys()
            for key, value in expected.items():
                if isinstance(value, np.ndarray):
                    assert entry[key].dtype == value.dtype and np.array_equal(entry[key], value), key
                else:
                    assert entry[key] == value, key
    assert respelled == len(CIFAR[dataset][1]) + 1  # every file of images
    (tmp_path / "a list").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(DataError, match="a list holds a list, not a CIFAR batch"):
        read_pickle(str(tmp_path / "a list"))


def _digits(seed=0, **kwargs) -> DigitsDataModule:
    dm = DigitsDataModule(seed=seed, batch_size=32, **LOADER, **kwargs)
    dm.setup("fit")
    return dm


def _samples(dm) -> Counter:
    return Counter((key, int(label)) for split in (dm.train_set, dm.val_set, dm.test_set)
                   for key, label in zip(_keys(split.images), split.targets, strict=True))


def test_digits_split_is_a_seeded_partition_of_the_1797_images():
    dm = _digits()
    assert dm.data_config == DataConfig(16, in_chans=1, mean=(0.5,), std=(0.5,), crop_pct=1.0,
                                        class_names=tuple("0123456789"))
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (1258, 180, 359)
    labels = torch.cat([dm.train_set.targets, dm.val_set.targets, dm.test_set.targets])
    assert torch.bincount(labels).tolist() == np.bincount(load_digits().target).tolist()
    # another seed partitions the same 1,797 (image, label) samples differently
    other = _digits(seed=1)
    assert _samples(other) == _samples(dm) and sum(_samples(dm).values()) == 1797
    assert not torch.equal(other.val_set.images, dm.val_set.images)
    assert torch.equal(_digits().val_set.images, dm.val_set.images)


def test_digits_batches():
    dm = _digits(image_size=12)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (32, 1, 12, 12) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert images.min() >= -1 and images.max() <= 1 and images.min() < -0.9  # (x - 0.5) / 0.5 of [0, 1]


@pytest.mark.parametrize("kwargs", [dict(val_fraction=0.0), dict(test_fraction=1.0),
                                    dict(val_fraction=0.5, test_fraction=0.5), dict(batch_size=0)])
def test_digits_bad_settings(kwargs):
    with pytest.raises(DataError):
        DigitsDataModule(**kwargs)


def test_read_image_turns_camera_photos_upright(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = 255  # white left half, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF Orientation: displayed turned 90 degrees clockwise
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    image = read_image(str(tmp_path / "photo.jpg"))
    assert image.size == (20, 40) and image.mode == "RGB"  # width and height swapped: upright
    shown = np.asarray(image).mean(axis=(1, 2))
    assert shown[:20].mean() > 200 and shown[20:].mean() < 50  # the stored left half is now the top
    assert read_image(str(tmp_path / "photo.jpg"), mode="L").mode == "L"
