"""The device-resident pipeline (`data.device_pipeline`), run with the device being the CPU: same outputs and
statistics as the per-image torchvision pipeline it replaces. RandAugment and ColorJitter: every op, per image,
equals torchvision's uint8 kernel exactly, and the draws follow torchvision's laws."""

from __future__ import annotations

import csv
import math

import lightning as L
import pytest
import torch
from conftest import folder_args, run_main
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from convmixer_pl.callbacks import PredictionWriter
from convmixer_pl.data import (
    CIFAR_MEAN,
    CIFAR_STD,
    Augmentation,
    CIFARDataModule,
    DataConfig,
    DataError,
    ImageFolderDataModule,
)
from convmixer_pl.data.augment import CIFAR_SCRIPT
from convmixer_pl.data.batched_ops import OPS, SIGNED, BatchColorJitter, BatchRandAugment
from convmixer_pl.data.device import (
    BatchAugment,
    DeviceLoader,
    erase,
    resized_crop,
    sample_crops,
    sample_erasing,
)
from convmixer_pl.module import ConvMixerClassifier
from convmixer_pl.preprocessing import Normalize
from convmixer_pl.resume import derive_seed

N = 20000  # draws per statistic: standard errors well below the tolerances used
CIFAR_CONFIG = DataConfig(32, mean=CIFAR_MEAN, std=CIFAR_STD, crop_pct=1.0)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _torchvision_crops(n: int, size: int, scale, ratio) -> torch.Tensor:
    crop = v2.RandomResizedCrop(size, scale=scale, ratio=ratio)
    image = torch.zeros(3, size, size, dtype=torch.uint8)
    torch.manual_seed(0)
    rows = [crop.make_params([image]) for _ in range(n)]
    return torch.tensor([[r["top"], r["left"], r["height"], r["width"]] for r in rows])


def test_resized_crop_equals_torchvision_resized_crop():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    boxes = torch.tensor([[0, 0, 24, 24], [5, 3, 27, 20], [0, 0, 32, 32], [10, 12, 17, 9]])
    flip = torch.tensor([False, True, False, True])
    out = resized_crop(images.float() / 255, boxes, 32, flip)
    for k in range(4):
        top, left, h, w = boxes[k].tolist()
        ref = TF.resized_crop(images[k].float() / 255, top, left, h, w, [32, 32], antialias=True)
        ref = ref.flip(-1) if flip[k] else ref
        torch.testing.assert_close(out[k], ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("scale, ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.75, 1.0), (1.0, 1.0))])
def test_crop_boxes_follow_torchvision_distribution(scale, ratio):
    ours = sample_crops(N, 32, 32, scale, ratio, _gen()).double()
    theirs = _torchvision_crops(4000, 32, scale, ratio).double()
    top, left, h, w = ours.unbind(1)
    assert (h >= 1).all() and (w >= 1).all() and (top + h <= 32).all() and (left + w <= 32).all()
    area, log_ratio = h * w / 1024, torch.log(w / h)
    t_area = theirs[:, 2] * theirs[:, 3] / 1024
    t_log_ratio = torch.log(theirs[:, 3] / theirs[:, 2])
    # same law: the means and spreads of area fraction, aspect and position agree within sampling error
    assert abs(area.mean() - t_area.mean()) < 0.015 and abs(area.std() - t_area.std()) < 0.015
    assert abs(log_ratio.mean() - t_log_ratio.mean()) < 0.02 and abs(log_ratio.std() - t_log_ratio.std()) < 0.02
    assert abs(top.mean() - theirs[:, 0].mean()) < 0.3 and abs(left.mean() - theirs[:, 1].mean()) < 0.3
    # and the configured bounds (rounding to whole pixels aside)
    assert area.min() >= scale[0] * 0.85 and area.max() <= 1.0
    if ratio == (1.0, 1.0):
        assert torch.equal(h, w)
    else:
        assert log_ratio.min() >= math.log(ratio[0]) - 0.1 and log_ratio.max() <= math.log(ratio[1]) + 0.1


def test_crop_falls_back_to_torchvisions_center_crop():
    # no try can fit an area above the image's: torchvision's fallback, the central crop clamped to the ratio
    for ratio in ((3 / 4, 4 / 3), (2.0, 3.0)):
        ours = sample_crops(50, 32, 32, (1.5, 2.0), ratio, _gen())
        theirs = _torchvision_crops(1, 32, (1.5, 2.0), ratio)
        assert (ours == theirs).all()


def test_erasing_follows_torchvision_distribution():
    boxes = sample_erasing(N, 32, 32, 0.25, (0.02, 0.33), (0.3, 3.3), _gen()).double()
    erased = boxes[:, 2] > 0
    assert abs(erased.double().mean() - 0.25) < 0.015  # the configured probability
    top, left, h, w = boxes[erased].unbind(1)
    area = h * w / 1024
    assert (top + h <= 32).all() and (left + w <= 32).all() and (h < 32).all() and (w < 32).all()
    assert area.min() >= 0.02 * 0.5 and area.max() <= 0.33 * 1.3
    tv = v2.RandomErasing(p=1.0, scale=(0.02, 0.33), ratio=(0.3, 3.3))
    image = torch.zeros(3, 32, 32)
    torch.manual_seed(0)
    params = [tv.make_params([image]) for _ in range(4000)]
    t_area = torch.tensor([p["h"] * p["w"] / 1024 for p in params], dtype=torch.double)
    t_log = torch.tensor([math.log(p["h"] / p["w"]) for p in params])
    assert abs(area.mean() - t_area.mean()) < 0.01 and abs(area.std() - t_area.std()) < 0.01
    assert abs(torch.log(h / w).mean() - t_log.mean()) < 0.05


def test_erase_fills_exactly_the_boxes():
    images = torch.randn(3, 3, 8, 8)
    boxes = torch.tensor([[1, 2, 3, 4], [0, 0, 0, 0], [5, 6, 3, 2]])  # height 0: not erased
    out = erase(images, boxes, 0.0)
    mask = torch.zeros(3, 1, 8, 8, dtype=torch.bool)
    mask[0, :, 1:4, 2:6] = True
    mask[2, :, 5:8, 6:8] = True
    mask = mask.expand_as(images)
    assert (out[mask] == 0).all() and torch.equal(out[~mask], images[~mask])
    noisy = erase(torch.zeros(1, 3, 32, 32), torch.tensor([[0, 0, 32, 31]]), None, _gen())
    assert abs(noisy.std().item() - 1) < 0.05 and (noisy[..., 31] == 0).all()  # "pixel": N(0, 1) noise


def test_batch_augment_shape_dtype_normalization_and_flips():
    images = torch.randint(0, 256, (400, 3, 32, 32), dtype=torch.uint8)
    plain = (images.float() / 255 - torch.tensor(CIFAR_MEAN)[:, None, None]) / torch.tensor(CIFAR_STD)[:, None, None]
    # the whole image, flipped half the time: every output is the normalised image or its mirror
    out = BatchAugment(32, CIFAR_MEAN, CIFAR_STD, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.5)(images, _gen())
    assert out.shape == (400, 3, 32, 32) and out.dtype == torch.float32 and out.device == images.device
    same = (out - plain).abs().amax(dim=(1, 2, 3)) < 1e-5
    mirrored = (out - plain.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert (same | mirrored).all()
    assert 0.4 < mirrored.double().mean() < 0.6
    # another output size; erasing every image fills a box with 0 (the normalised mean)
    out = BatchAugment(24, CIFAR_MEAN, CIFAR_STD, scale=(0.75, 1.0), ratio=(1.0, 1.0), erase_prob=1.0)(images, _gen())
    assert out.shape == (400, 3, 24, 24)
    assert ((out == 0).flatten(1).sum(1) >= 3 * 2).all()


def test_device_loader_epochs_and_shards():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 4, 4).contiguous()
    targets = torch.arange(10)
    to_float = Normalize((0.0,) * 3, (1.0,) * 3)  # pixel value = index / 255
    loader = DeviceLoader(images, targets, 4, "cpu", to_float)
    assert len(loader) == 3
    batches = list(loader)
    assert [len(t) for _, t in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([t for _, t in batches]), targets)
    expected = v2.ToDtype(torch.float32, scale=True)(torch.arange(4, dtype=torch.uint8))
    assert torch.equal(batches[0][0][:, 0, 0, 0], expected)  # images travel with their targets
    train = DeviceLoader(images, targets, 4, "cpu", to_float, shuffle=True, drop_last=True, seed=3)
    assert len(train) == 2
    first = torch.cat([t for _, t in train])
    again = torch.cat([t for _, t in train])
    train.sampler.set_epoch(1)
    other = torch.cat([t for _, t in train])
    assert torch.equal(first, again) and not torch.equal(first, other) and len(set(first.tolist())) == 8
    shards = [torch.cat([t for _, t in DeviceLoader(images, targets, 5, "cpu", to_float, shuffle=True,
                                                    num_replicas=2, rank=r)]) for r in (0, 1)]
    assert sorted(torch.cat(shards).tolist()) == list(range(10))


def test_device_loader_resumes_mid_epoch_with_the_same_batches():
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    make = lambda: DeviceLoader(images, torch.arange(40), 8, "cpu", BatchAugment(  # noqa: E731
        8, CIFAR_MEAN, CIFAR_STD, scale=(0.5, 1.0), erase_prob=0.5), shuffle=True, drop_last=True, seed=1)
    loader = make()
    loader.sampler.set_epoch(2)
    iterator = iter(loader)
    first = [next(iterator) for _ in range(2)]
    rest = list(iterator)
    resumed = make()  # as the data module resumes it: the epoch, then the samples of the 2 batches trained on
    resumed.sampler.set_epoch(2)
    resumed.sampler.load_state_dict({"yielded": 2 * 8})
    again = list(resumed)
    assert len(first) + len(rest) == 5 and len(again) == 3
    for (x, y), (x2, y2) in zip(rest, again, strict=True):
        assert torch.equal(y, y2) and torch.equal(x, x2)
    assert len(list(resumed)) == 5  # the skip applies to the resumed epoch only


def test_cifar_device_pipeline_matches_the_cpu_pipeline(cifar_root):
    kwargs = dict(root=str(cifar_root), verify_checksums=False, val_fraction=0.2, batch_size=16, num_workers=0,
                  augment=Augmentation(scale=(0.75, 1.0), ratio=(1.0, 1.0)))
    device_dm = CIFARDataModule(**kwargs, device_pipeline=True)
    cpu_dm = CIFARDataModule(**kwargs)
    device_dm.setup("fit")
    cpu_dm.setup("fit")
    images, targets = next(iter(device_dm.train_dataloader()))
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float32 and targets.dtype == torch.long
    ref_images, _ = next(iter(cpu_dm.train_dataloader()))
    # same normalisation: the value ranges of the two pipelines agree
    assert abs(images.mean() - ref_images.mean()) < 0.2 and abs(images.min() - ref_images.min()) < 0.05
    # evaluation has no randomness: the same tensors as the per-image path
    val_images, val_targets = next(iter(device_dm.val_dataloader()))
    cpu_images, cpu_targets = next(iter(cpu_dm.val_dataloader()))
    assert torch.equal(val_images, cpu_images)
    assert torch.equal(val_targets, cpu_targets)


def test_cifar_device_pipeline_takes_the_scripts_augmentation_and_bicubic_randaugment_is_refused(cifar_root):
    CIFARDataModule(root=str(cifar_root), device_pipeline=True)  # the script's RandAugment and ColorJitter: accepted
    # torchvision's tensor RandAugment cannot resample bicubic (it fails at its first geometric op, mid-training):
    # refused when the options are read, for both pipelines
    with pytest.raises(DataError, match="data.augment.ra_interpolation 'bicubic'.*nearest or bilinear"):
        Augmentation(ra_num_ops=1, ra_interpolation="bicubic")


@pytest.mark.parametrize("interpolation", ["bicubic", "random"])
def test_a_crop_interpolation_other_than_bilinear_is_refused_in_one_line(cifar_root, image_folder, interpolation):
    augment = Augmentation(interpolation=interpolation)
    for make in (lambda **kw: CIFARDataModule(root=str(cifar_root), verify_checksums=False, **kw),
                 lambda **kw: ImageFolderDataModule(root=str(image_folder), image_size=16, **kw)):
        make(augment=augment, num_workers=0)  # the per-image pipeline crops with any of them
        with pytest.raises(DataError) as info:  # refused when built, not at the first batch
            make(augment=augment, device_pipeline=True, num_workers=0)
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith(f"data.augment.interpolation {interpolation!r}: data.device_pipeline crops with "
                                  "bilinear sampling only; set data.augment.interpolation: bilinear, or "
                                  "data.device_pipeline: false")
    with pytest.raises(DataError, match="data.augment.interpolation"):
        BatchAugment.from_augmentation(augment, CIFAR_CONFIG)


def test_the_command_refuses_bicubic_crops_on_the_device_pipeline_in_one_line(image_folder, tmp_path, capsys):
    code, err = run_main(capsys, "fit", *folder_args(image_folder, "--data.device_pipeline", "true",
                                                     "--data.augment.interpolation", "bicubic",
                                                     "--checkpoint.dirpath", tmp_path / "run"))
    assert code == 2 and err.splitlines() == [
        "convmixer: error: data.augment.interpolation 'bicubic': data.device_pipeline crops with bilinear sampling "
        "only; set data.augment.interpolation: bilinear, or data.device_pipeline: false for the per-image pipeline"]
    written = [path.name for path in (tmp_path / "run").rglob("*") if not path.name.startswith(".")]
    assert written == []  # stopped before training: no checkpoint, no log


def test_each_training_batch_is_augmented_from_its_own_seed():
    """Batch b of epoch e on rank r is drawn from a generator seeded by derive_seed(seed, e, r, b): rebuilt here from
    the images alone, it is the loader's batch (so a resumed epoch, which starts at batch b, draws the same)."""
    images = torch.randint(0, 256, (24, 3, 8, 8), dtype=torch.uint8, generator=_gen(4))
    augment = BatchAugment(8, CIFAR_MEAN, CIFAR_STD, scale=(0.3, 1.0), erase_prob=0.5)
    for rank in (0, 1):
        loader = DeviceLoader(images, torch.arange(24), 4, "cpu", augment, shuffle=True, drop_last=True, seed=5,
                              num_replicas=2, rank=rank)
        loader.sampler.set_epoch(3)
        order = list(loader.sampler)
        batches = list(loader)
        assert len(batches) == 3
        for b, (x, y) in enumerate(batches):
            index = torch.tensor(order[4 * b:4 * b + 4])
            assert torch.equal(y, index)
            generator = torch.Generator().manual_seed(derive_seed(5, 3, rank, b))
            assert torch.equal(x, augment(images[index], generator))
        other_epoch = _gen(derive_seed(5, 2, rank, 0))
        assert not torch.equal(batches[0][0], augment(images[torch.tensor(order[:4])], other_epoch))


def test_fit_with_the_device_pipeline(cifar_root):
    dm = CIFARDataModule(root=str(cifar_root), verify_checksums=False, val_fraction=0.2, batch_size=16,
                         num_workers=0, augment=Augmentation(scale=(0.75, 1.0), re_prob=0.5), device_pipeline=True)
    model = ConvMixerClassifier(dim=8, depth=1, kernel_size=3, patch_size=4, data_config=dm.data_config)
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert trainer.num_training_batches == 5  # 80 images, batch 16
    assert trainer.global_step == 10
    assert trainer.train_dataloader.sampler.epoch == 1  # Lightning advanced the shuffling like a DataLoader's
    assert "val/acc1" in trainer.callback_metrics


def test_fit_with_the_device_pipeline_and_the_scripts_randaugment_and_jitter(cifar_root):
    dm = CIFARDataModule(root=str(cifar_root), verify_checksums=False, val_fraction=0.2, batch_size=16,
                         num_workers=0, device_pipeline=True)  # the default augmentation: CIFAR_SCRIPT
    assert dm.augment == CIFAR_SCRIPT and CIFAR_SCRIPT.ra_num_ops == 1 and CIFAR_SCRIPT.color_jitter == 0.1
    model = ConvMixerClassifier(dim=8, depth=1, kernel_size=3, patch_size=4, data_config=dm.data_config)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 5
    transform = trainer.train_dataloader.transform
    assert transform.randaugment.num_ops == 1 and transform.randaugment.magnitude == 8
    assert transform.color_jitter.ranges == ((0.9, 1.1),) * 3
    assert math.isfinite(trainer.callback_metrics["train/loss_epoch"])


def test_cifar_evaluates_at_image_size_on_both_pipelines(cifar_root):
    kwargs = dict(root=str(cifar_root), verify_checksums=False, val_fraction=0.2, batch_size=16, num_workers=0,
                  augment=Augmentation(), image_size=48)
    device_dm, cpu_dm = CIFARDataModule(**kwargs, device_pipeline=True), CIFARDataModule(**kwargs)
    device_dm.setup("fit")
    cpu_dm.setup("fit")
    for split in ("val_dataloader", "test_dataloader"):
        cpu_images, _ = next(iter(getattr(cpu_dm, split)()))
        device_images, _ = next(iter(getattr(device_dm, split)()))
        assert cpu_images.shape == device_images.shape == (16, 3, 48, 48)  # what training crops to, not CIFAR's 32
        # both normalise the same uint8 images, upscaled once at set-up by the data config's image transform
        assert torch.equal(device_images, cpu_images)


def test_predict_with_the_device_pipeline_writes_every_test_image(cifar_root, tmp_path):
    dm = CIFARDataModule(root=str(cifar_root), verify_checksums=False, val_fraction=0.2, batch_size=16,
                         num_workers=0, augment=Augmentation(), device_pipeline=True)
    model = ConvMixerClassifier(dim=8, depth=1, kernel_size=3, patch_size=4,
                                data_config=dm.data_config)  # metadata flows data -> model (the CLI links it)
    writer = PredictionWriter(output=str(tmp_path / "predictions.csv"), top_k=2)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[writer])
    trainer.predict(model, datamodule=dm, return_predictions=False)
    with open(tmp_path / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["index"]) for row in rows] == list(range(len(dm.test_set)))
    class_names = dm.data_config.class_names
    assert [row["target"] for row in rows] == [class_names[int(t)] for t in dm.test_set.targets]


# --- RandAugment and ColorJitter, batched: torchvision's uint8 kernels value for value, and its laws of draws ---

TV_SPACE = v2.RandAugment._AUGMENTATION_SPACE  # torchvision's own table of ops, magnitudes and signs


def _ranged_images(n: int, height: int = 32, width: int = 32, seed: int = 0) -> torch.Tensor:
    """uint8 images whose channels span random sub-ranges (so autocontrast and equalize have work to do), and a
    constant, a gray, a two-valued and a full-range image among them."""
    g = _gen(seed)
    low = torch.randint(0, 200, (n, 3, 1, 1), generator=g)
    span = torch.randint(1, 256, (n, 3, 1, 1), generator=g)
    images = (low + torch.rand(n, 3, height, width, generator=g) * span).clamp(0, 255).to(torch.uint8)
    images[0] = 77
    images[1] = images[1, :1]
    images[2] = torch.where(torch.rand(3, height, width, generator=g) < 0.3, 10, 200).to(torch.uint8)
    images[3] = torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)
    return images


def _tv_magnitude(name: str, magnitude: int, bins: int, height: int, width: int, negative: bool) -> float:
    """What torchvision's RandAugment passes to op `name`, computed from its own table."""
    magnitudes, signed = TV_SPACE[name]
    values = magnitudes(bins, height, width)
    value = 0.0 if values is None else float(values[magnitude])
    return -value if signed and negative else value


def _tv_op(image: torch.Tensor, name: str, magnitude: float, interpolation: str = "nearest") -> torch.Tensor:
    tv = v2.RandAugment(interpolation=interpolation)
    return tv._apply_image_or_video_transform(image, name, magnitude, interpolation=tv.interpolation, fill=tv._fill)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("size, magnitude, bins, interpolation", [
    ((32, 32), 8, 31, "nearest"),  # the CIFAR-10 script's
    ((32, 32), 12, 31, "bilinear"),  # the 25/100-epoch recipes' magnitude
    ((20, 28), 30, 31, "nearest"),  # not square (height and width apart), the largest magnitude
    ((20, 28), 9, 11, "bilinear"),  # timm's m9
    ((32, 32), 0, 31, "nearest"),  # magnitude 0: rotate's identity fast path, solarize at 255, posterize 8 bits
])
def test_each_randaugment_op_equals_torchvision_per_image(name, size, magnitude, bins, interpolation):
    # exact: every op does torchvision's uint8 float32 arithmetic in the same order (addcmul for its fused
    # `add_(alpha=)`, the same matrix and grid for the affine ones), then its truncation to integers
    images = _ranged_images(16, *size)
    ra = BatchRandAugment(1, magnitude, bins, interpolation)
    negative = torch.arange(16) % 2 == 1
    for gather in (True, False):
        out = ra.apply(images.float(), torch.full((16,), OPS.index(name)), negative, gather=gather)
        assert out.dtype == torch.float32
        for k in range(16):
            ref = _tv_op(images[k], name, _tv_magnitude(name, magnitude, bins, *size, bool(negative[k])), interpolation)
            assert torch.equal(out[k], ref.float()), (name, k, gather)


def test_randaugment_applies_each_images_own_ops_in_turn():
    images = _ranged_images(64)
    ra = BatchRandAugment(2, 12, 31, "nearest")
    ops, negative = ra.sample(64, _gen(3))
    assert len(set(ops[0].tolist())) == len(OPS)  # one batch mixes every op
    out = ra(images.float(), _gen(3))
    where = images.float()
    for slot in range(2):
        where = ra.apply(where, ops[slot], negative[slot], gather=False)
    assert torch.equal(out, where)  # the CPU's gathering and the devices' torch.where agree
    for k in range(64):
        ref = images[k]
        for slot in range(2):
            name = OPS[ops[slot, k]]
            ref = _tv_op(ref, name, _tv_magnitude(name, 12, 31, 32, 32, bool(negative[slot, k])))
        assert torch.equal(out[k], ref.float()), k


@pytest.mark.parametrize("magnitude, bins", [(8, 31), (9, 11)])
def test_randaugment_draws_follow_torchvision(monkeypatch, magnitude, bins):
    ra = BatchRandAugment(2, magnitude, bins)
    ops, negative = ra.sample(N, _gen())
    tv = v2.RandAugment(num_ops=2, magnitude=magnitude, num_magnitude_bins=bins)
    seen = []
    monkeypatch.setattr(tv, "_apply_image_or_video_transform",
                        lambda image, name, value, **kwargs: seen.append((name, value)) or image)
    torch.manual_seed(0)
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    for _ in range(3000):
        tv(image)
    theirs = torch.tensor([OPS.index(name) for name, _ in seen])
    p = 1 / len(OPS)
    se = math.sqrt(p * (1 - p) / ops.numel()) + math.sqrt(p * (1 - p) / len(theirs))
    ours_freq = torch.bincount(ops.flatten(), minlength=len(OPS)).double() / ops.numel()
    theirs_freq = torch.bincount(theirs, minlength=len(OPS)).double() / len(theirs)
    assert (ours_freq - theirs_freq).abs().max() < 4 * se  # uniform over the same 14 ops
    assert (ours_freq - p).abs().max() < 4 * math.sqrt(p * (1 - p) / ops.numel())
    assert abs(negative.double().mean() - 0.5) < 4 * 0.5 / math.sqrt(negative.numel())
    # the magnitudes: per op, what torchvision applied is what we apply for the two signs
    table = ra.magnitudes(32, 32)
    for k, name in enumerate(OPS):
        values = {value for seen_name, value in seen if seen_name == name}
        assert values == set(table[k]), name
        if name in SIGNED:
            negative_share = sum(value < 0 for seen_name, value in seen if seen_name == name) / sum(
                seen_name == name for seen_name, _ in seen)
            assert abs(negative_share - 0.5) < 0.1, name
            assert table[k][1] == -table[k][0] != 0 or magnitude == 0


def _tv_jitter_params(factors: torch.Tensor, order: torch.Tensor, k: int, active=(True, True, True)) -> dict:
    """torchvision's ColorJitter parameters for image k: its order (hue, id 3, last and off) and factors."""
    b, c, s = (float(f) if on else None for f, on in zip(factors[k], active, strict=True))
    return dict(fn_idx=torch.tensor(order[k].tolist() + [3]), brightness_factor=b, contrast_factor=c,
                saturation_factor=s, hue_factor=None)


@pytest.mark.parametrize("strengths", [(0.1, 0.1, 0.1), (0.4, 0.4, 0.4), (1.5, 1.5, 1.5), (0.3, 0.0, 0.2)])
def test_color_jitter_equals_torchvision_per_image(strengths):
    images = _ranged_images(48)
    jitter = BatchColorJitter(*strengths)
    factors, order = jitter.sample(48, _gen(1))
    out = jitter.apply(images.float(), factors, order)
    tv = v2.ColorJitter(*(x or None for x in strengths))
    active = tuple(x > 0 for x in strengths)  # an adjustment at strength 0: factor 1, an exact no-op here
    for k in range(48):
        ref = tv.transform(images[k], _tv_jitter_params(factors, order, k, active))
        assert torch.equal(out[k], ref.float()), k


def test_color_jitter_factors_and_order_follow_torchvision():
    jitter = BatchColorJitter(0.1, 0.1, 0.1)
    tv = v2.ColorJitter(0.1, 0.1, 0.1)
    assert jitter.ranges == (tv.brightness, tv.contrast, tv.saturation)
    factors, order = jitter.sample(N, _gen())
    assert factors.dtype == torch.float32 and factors.shape == (N, 3)
    assert (factors >= 0.9).all() and (factors <= 1.1).all()
    assert (factors.amin(0) < 0.901).all() and (factors.amax(0) > 1.099).all()  # uniform over the whole range
    assert ((factors.double().mean(0) - 1).abs() < 4 * 0.2 / math.sqrt(12 * N)).all()
    assert abs(torch.corrcoef(factors.T.double())[0, 1]) < 0.05  # independent per adjustment
    assert BatchColorJitter(1.5, 1.5, 1.5).ranges == ((0.0, 2.5),) * 3 == (v2.ColorJitter(1.5).brightness,) * 3
    # the order: a permutation per image, the six equally likely, as torchvision's randperm per call
    assert (order.sort(1).values == torch.arange(3)).all()
    code = order[:, 0] * 9 + order[:, 1] * 3 + order[:, 2]
    counts = torch.bincount(code, minlength=27)[code.unique()]
    assert len(counts) == 6 and len(order[:64].unique(dim=0)) == 6  # varied within one batch too
    torch.manual_seed(0)
    tv_orders = [tuple(i for i in tv.make_params([])["fn_idx"].tolist() if i < 3) for _ in range(6000)]
    tv_share = torch.tensor([tv_orders.count(o) for o in sorted(set(tv_orders))]).double() / len(tv_orders)
    share = counts.double() / N
    assert ((share - 1 / 6).abs() < 4 * math.sqrt(5 / 36 / N)).all()
    assert ((share - tv_share).abs() < 4 * (math.sqrt(5 / 36 / N) + math.sqrt(5 / 36 / 6000))).all()


def test_batch_augment_equals_torchvisions_pipeline_given_the_same_draws(monkeypatch):
    # crop of the whole image and a flip every time: RandAugment and jitter see the image as torchvision's do
    images = _ranged_images(24)
    augment = BatchAugment(32, CIFAR_MEAN, CIFAR_STD, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0, ra_num_ops=2,
                           ra_magnitude=12, color_jitter=0.4)
    draws = {}
    for key, step in (("ra", augment.randaugment), ("jitter", augment.color_jitter)):
        monkeypatch.setattr(step, "sample", lambda n, g, key=key, sample=step.sample: draws.setdefault(
            key, sample(n, g)))
    out = augment(images, _gen(5))
    assert out.shape == (24, 3, 32, 32) and out.dtype == torch.float32
    (ops, negative), (factors, order) = draws["ra"], draws["jitter"]
    jitter = v2.ColorJitter(0.4, 0.4, 0.4)
    finish = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(CIFAR_MEAN, CIFAR_STD)])
    for k in range(24):
        ref = TF.horizontal_flip(images[k])  # crop, flip, RandAugment, jitter, float, normalize: the CPU order
        for slot in range(2):
            name = OPS[ops[slot, k]]
            ref = _tv_op(ref, name, _tv_magnitude(name, 12, 31, 32, 32, bool(negative[slot, k])))
        ref = finish(jitter.transform(ref, _tv_jitter_params(factors, order, k)))
        torch.testing.assert_close(out[k], ref, atol=1e-6, rtol=0)


def test_batch_augment_with_randaugment_and_jitter_is_reproducible():
    images = _ranged_images(64)
    augment = BatchAugment.from_augmentation(CIFAR_SCRIPT, CIFAR_CONFIG)
    assert augment.randaugment is not None and augment.color_jitter is not None and augment.erase_prob == 0.25
    out = augment(images, _gen(7))
    assert out.shape == (64, 3, 32, 32) and out.dtype == torch.float32 and out.device == images.device
    assert torch.equal(out, augment(images, _gen(7))) and not torch.equal(out, augment(images, _gen(8)))
    assert torch.equal(images, _ranged_images(64))  # the stored split is not written to
    # un-normalised, the images not erased lie on torchvision's uint8 grid
    values = (out * torch.tensor(CIFAR_STD)[:, None, None] + torch.tensor(CIFAR_MEAN)[:, None, None]) * 255
    on_grid = ((values - values.round()).abs() < 1e-3).flatten(1).all(1)
    assert on_grid.double().mean() > 0.5 and (values > -1e-3).all() and (values < 255 + 1e-3).all()
    plain = BatchAugment.from_augmentation(Augmentation(scale=(0.75, 1.0), ratio=(1.0, 1.0), ra_num_ops=2,
                                                        ra_magnitude=12, ra_interpolation="bilinear"),
                                           CIFAR_CONFIG)
    assert plain.color_jitter is None and plain.randaugment.interpolation == "bilinear"


def test_rounded_crop_is_torchvisions_uint8_crop_within_one_level():
    # with RandAugment or jitter on, the float crop is rounded to uint8 values; torchvision's uint8 resampling
    # computes in fixed point and rounds some values the other way: at most one level apart
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=_gen())
    boxes = sample_crops(40, 32, 32, (0.5, 1.0), (3 / 4, 4 / 3), _gen())
    out = resized_crop(images.float(), boxes, 32).round()
    for k in range(40):
        top, left, h, w = boxes[k].tolist()
        ref = TF.resized_crop(images[k], top, left, h, w, [32, 32], antialias=True).float()
        assert (out[k] - ref).abs().max() <= 1
