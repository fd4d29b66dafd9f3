"""`DataConfig`, the evaluation preprocessing as one object: its checks and defaults, its two halves (per image and
per batch) against torchvision's own transforms, and its timm / checkpoint forms."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from convmixer_pl.data import CIFAR_MEAN, CIFAR_STD, DataError, ImageFolderDataModule
from convmixer_pl.preprocessing import IMAGENET_MEAN, IMAGENET_STD, DataConfig, Normalize

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _torchvision_eval(config: DataConfig) -> v2.Compose:
    """The evaluation transform spelled out in torchvision's steps: what both halves together must equal."""
    return v2.Compose([v2.ToImage(), v2.Resize(int(config.image_size / config.crop_pct),
                                               interpolation=v2.InterpolationMode(config.interpolation),
                                               antialias=True),
                       v2.CenterCrop(config.image_size), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(config.mean, config.std)])


def _torchvision_batch(config: DataConfig) -> v2.Compose:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(config.mean, config.std)])


def _pil(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


# -- checks and defaults --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, needle", [
    ("image_size", 0, "image_size must be a positive integer, got 0"),
    ("image_size", -8, "image_size must be a positive integer, got -8"),
    ("image_size", 16.0, "image_size must be a positive integer, got 16.0"),
    ("in_chans", 2, "in_chans 2: images are read as grey (1), RGB (3) or RGBA (4)"),
    ("mean", (0.5, 0.5), "mean (0.5, 0.5) and std (0.229, 0.224, 0.225) need one value per channel (3)"),
    ("std", (0.2, 0.2, 0.2, 0.2), "mean (0.485, 0.456, 0.406) and std (0.2, 0.2, 0.2, 0.2) need one value"),
    ("std", (0.2, 0.0, 0.2), "std > 0"),
    ("crop_pct", 0.0, "crop_pct must be in (0, 1], got 0.0"),
    ("crop_pct", 1.5, "crop_pct must be in (0, 1], got 1.5"),
    ("interpolation", "nearest", "interpolation must be bilinear or bicubic, got 'nearest'"),
])
def test_each_bad_field_is_one_line_naming_it_and_its_value(field, value, needle):
    with pytest.raises(DataError) as info:
        DataConfig(**{"image_size": 16, field: value})
    assert isinstance(info.value, ValueError)  # entry points turn ValueErrors into one line and exit 2
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_one_default_per_field_and_the_image_folder_takes_them(image_folder):
    config = DataConfig(224)
    assert (config.in_chans, config.mean, config.std, config.crop_pct, config.interpolation, config.class_names) == (
        3, IMAGENET_MEAN, IMAGENET_STD, 0.875, "bilinear", ())
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
    assert [f.name for f in dataclasses.fields(DataConfig) if f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING] == ["image_size"]
    # a data module whose preprocessing options are left unset has DataConfig's defaults, not its own
    dm = ImageFolderDataModule(root=str(image_folder), num_workers=0)
    assert dm.data_config == DataConfig(224, class_names=("cat", "dog", "owl"))
    # 224 px at the default crop_pct: the short side resized to 256, as timm's ImageNet evaluation does
    assert config.image_transform().steps.transforms[0].size == [256]


def test_properties_and_plain_values():
    config = DataConfig(20, in_chans=1, mean=[0.5], std=[0.25], crop_pct=1.0, class_names=["a", "b", "c"])
    assert (config.num_classes, config.pil_mode, config.input_size) == (3, "L", (1, 20, 20))
    assert (config.mean, config.std, config.class_names) == ((0.5,), (0.25,), ("a", "b", "c"))  # lists -> tuples
    assert config == DataConfig(20, in_chans=1, mean=(0.5,), std=(0.25,), crop_pct=1.0, class_names=("a", "b", "c"))
    assert hash(config) == hash(DataConfig(20, 1, (0.5,), (0.25,), 1.0, "bilinear", ("a", "b", "c")))
    assert DataConfig(8, in_chans=4, mean=(0.5,) * 4, std=(0.5,) * 4).pil_mode == "RGBA"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.image_size = 32


# -- the per-batch half ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("in_chans, mean, std", [(3, CIFAR_MEAN, CIFAR_STD), (3, IMAGENET_MEAN, IMAGENET_STD),
                                                 (1, (0.5,), (0.5,)), (4, (0.1, 0.2, 0.3, 0.4), (0.9, 0.8, 0.7, 0.6))])
def test_batch_transform_is_torchvisions_to_dtype_and_normalize_value_for_value(in_chans, mean, std):
    config = DataConfig(8, in_chans=in_chans, mean=mean, std=std)
    images = torch.randint(0, 256, (5, in_chans, 7, 9), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images[0] = 0
    images[1] = 255  # the ends of the range
    original = images.clone()
    batch = config.batch_transform()
    expected = _torchvision_batch(config)(images)
    out = batch(images)
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert torch.equal(out, expected)  # (N, C, H, W)
    for k in range(5):
        assert torch.equal(batch(images[k]), expected[k])  # (C, H, W)
    # float images are taken as already in [0, 1]: normalised only
    scaled = images.float() / 255
    assert torch.equal(batch(scaled), v2.Normalize(mean, std)(scaled))
    assert torch.equal(images, original)  # the held uint8 images are not written to


def test_normalize_builds_its_statistics_once_per_device():
    normalize = Normalize(CIFAR_MEAN, CIFAR_STD)
    images = torch.rand(4, 3, 8, 8)
    torch.testing.assert_close(normalize(images), v2.Normalize(CIFAR_MEAN, CIFAR_STD)(images), rtol=0, atol=0)
    made = dict(normalize._tensors)
    normalize(torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8))
    assert normalize._tensors.keys() == made.keys() == {images.device}
    assert all(a is b for a, b in zip(normalize._tensors[images.device], made[images.device], strict=True))


# -- the per-image half, and both ----------------------------------------------------------------------------------

CONFIGS = [DataConfig(24, crop_pct=0.96, interpolation="bicubic"), DataConfig(16),
           DataConfig(32, mean=CIFAR_MEAN, std=CIFAR_STD, crop_pct=1.0),
           DataConfig(12, in_chans=1, mean=(0.5,), std=(0.5,), crop_pct=1.0)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.image_size}px-{c.crop_pct}-{c.interpolation}")
def test_image_transform_of_pil_images_and_uint8_batches_is_torchvisions_resize_and_crop(config):
    resize_and_crop = config.image_transform()
    reference = v2.Compose(_torchvision_eval(config).transforms[:3])
    for width, height in ((40, 30), (23, 57), (config.image_size, config.image_size), (64, 64)):
        image = _pil(width, height, config.pil_mode, seed=width)
        out = resize_and_crop(image)
        assert out.dtype == torch.uint8 and out.shape == config.input_size
        assert torch.equal(out, reference(image))
    # a batch of uint8 images of one size: each the same as alone
    batch = torch.randint(0, 256, (4, config.in_chans, 40, 30), dtype=torch.uint8)
    out = resize_and_crop(batch)
    assert out.dtype == torch.uint8 and out.shape == (4, *config.input_size)
    for k in range(4):
        assert torch.equal(out[k], reference(batch[k]))


def test_an_image_already_at_the_size_passes_through_only_without_a_crop():
    config = DataConfig(32, crop_pct=1.0)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    out = config.image_transform()(images)
    assert torch.equal(out, images) and out.data_ptr() == images.data_ptr()  # not copied
    zoomed = DataConfig(32, crop_pct=0.875).image_transform()(images)  # resized to 36, then the centre 32
    assert zoomed.shape == images.shape and not torch.equal(zoomed, images)
    assert torch.equal(zoomed, v2.CenterCrop(32)(v2.Resize(36, antialias=True)(images)))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.image_size}px-{c.crop_pct}-{c.interpolation}")
def test_the_two_halves_compose_to_eval_transform(config):
    eval_transform, image_half, batch_half = config.eval_transform(), config.image_transform(), config.batch_transform()
    reference = _torchvision_eval(config)
    for width, height, seed in ((40, 30, 0), (23, 57, 1), (config.image_size, config.image_size, 2)):
        image = _pil(width, height, config.pil_mode, seed)
        out = eval_transform(image)
        assert out.dtype == torch.float32 and out.shape == config.input_size
        assert torch.equal(out, batch_half(image_half(image)))
        assert torch.equal(out, reference(image))
    # split across processes as the device pipeline and the server split it: per image, then a whole batch
    images = [_pil(50, 35, config.pil_mode, seed) for seed in range(3)]
    batched = batch_half(torch.stack([image_half(image) for image in images]))
    assert torch.equal(batched, torch.stack([eval_transform(image) for image in images]))


# -- timm's and the checkpoints' forms ---------------------------------------------------------------------------------

def test_pretrained_cfg_is_timms_and_timm_preprocesses_the_same():
    from timm.data import create_transform, resolve_data_config

    config = DataConfig(24, crop_pct=0.9, interpolation="bicubic", class_names=("a", "b"))
    cfg = config.pretrained_cfg()
    assert cfg == {"input_size": [3, 24, 24], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                   "crop_pct": 0.9, "interpolation": "bicubic"}
    resolved = resolve_data_config(pretrained_cfg=cfg)
    assert {key: resolved[key] for key in cfg} == cfg
    # timm's evaluation transform (PIL resize) from those numbers: the same images within one uint8 level
    image = _pil(53, 37, seed=3)
    level = 1.01 / 255 / min(config.std)
    torch.testing.assert_close(create_transform(**resolved)(image), config.eval_transform()(image), rtol=0,
                               atol=level)


def test_as_dict_and_from_dict_round_trip_through_json_and_a_checkpoint(tmp_path):
    config = DataConfig(20, in_chans=1, mean=(0.5,), std=(0.25,), crop_pct=0.8, interpolation="bicubic",
                        class_names=("zero", "one"))
    plain = config.as_dict()
    assert plain == {"image_size": 20, "in_chans": 1, "mean": [0.5], "std": [0.25], "crop_pct": 0.8,
                     "interpolation": "bicubic", "class_names": ["zero", "one"]}
    assert DataConfig.from_dict(json.loads(json.dumps(plain))) == config
    torch.save({"data_config": plain}, tmp_path / "saved.pt")  # as checkpoints hold it: loadable weights-only
    assert DataConfig.from_dict(torch.load(tmp_path / "saved.pt", weights_only=True)["data_config"]) == config
    assert DataConfig.from_dict(None) is None and DataConfig.from_dict(config) is config
    with pytest.raises(DataError, match="crop_pct must be in"):
        DataConfig.from_dict({**plain, "crop_pct": 2.0})  # a stored dict is checked like a new one
