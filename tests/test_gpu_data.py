"""The device-resident CIFAR pipeline, run with the device being the CPU: same outputs and statistics as the
per-image torchvision pipeline it replaces."""

from __future__ import annotations

import csv
import math

import lightning as L
import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from convmixer_pl.callbacks import PredictionWriter
from convmixer_pl.data import CIFAR_MEAN, CIFAR_STD, Augmentation, CIFARDataModule, DataError
from convmixer_pl.data.device import (
    BatchAugment,
    BatchEval,
    DeviceLoader,
    Normalize,
    erase,
    resized_crop,
    sample_crops,
    sample_erasing,
)
from convmixer_pl.module import ConvMixerClassifier

N = 20000  # draws per statistic: standard errors well below the tolerances used


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
    loader = DeviceLoader(images, targets, 4, "cpu", BatchEval(4, (0.0,) * 3, (1 / 255,) * 3))  # pixel value = index
    assert len(loader) == 3
    batches = list(loader)
    assert [len(t) for _, t in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([t for _, t in batches]), targets)
    assert torch.equal(batches[0][0][:, 0, 0, 0], torch.arange(4.0))  # images travel with their targets
    train = DeviceLoader(images, targets, 4, "cpu", BatchEval(4, (0.0,) * 3, (1.0,) * 3), shuffle=True, drop_last=True,
                         seed=3)
    assert len(train) == 2
    first = torch.cat([t for _, t in train])
    again = torch.cat([t for _, t in train])
    train.sampler.set_epoch(1)
    other = torch.cat([t for _, t in train])
    assert torch.equal(first, again) and not torch.equal(first, other) and len(set(first.tolist())) == 8
    shards = [torch.cat([t for _, t in DeviceLoader(images, targets, 5, "cpu", BatchEval(4, (0.0,) * 3, (1.0,) * 3),
                                                    shuffle=True, num_replicas=2, rank=r)]) for r in (0, 1)]
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


def test_cifar_gpu_pipeline_matches_the_cpu_pipeline(cifar_root):
    kwargs = dict(root=str(cifar_root), verify_checksums=False, val_fraction=0.2, batch_size=16, num_workers=0,
                  augment=Augmentation(scale=(0.75, 1.0), ratio=(1.0, 1.0)))
    device_dm = CIFARDataModule(**kwargs, gpu_pipeline=True)
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
    torch.testing.assert_close(val_images, cpu_images, atol=1e-5, rtol=0)
    assert torch.equal(val_targets, cpu_targets)


def test_cifar_gpu_pipeline_refuses_per_image_only_augmentation(cifar_root):
    with pytest.raises(DataError, match="data.augment.ra_num_ops"):
        CIFARDataModule(root=str(cifar_root), gpu_pipeline=True)


def test_fit_with_the_gpu_pipeline(cifar_root):
    dm = CIFARDataModule(root=str(cifar_root), verify_checksums=False, val_fraction=0.2, batch_size=16,
                         num_workers=0, augment=Augmentation(scale=(0.75, 1.0), re_prob=0.5), gpu_pipeline=True)
    model = ConvMixerClassifier(dim=8, depth=1, kernel_size=3, patch_size=4, num_classes=10, image_size=32)
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert trainer.num_training_batches == 5  # 80 images, batch 16
    assert trainer.global_step == 10
    assert trainer.train_dataloader.sampler.epoch == 1  # Lightning advanced the shuffling like a DataLoader's
    assert "val/acc1" in trainer.callback_metrics


def test_cifar_evaluates_at_image_size_on_both_pipelines(cifar_root):
    kwargs = dict(root=str(cifar_root), verify_checksums=False, val_fraction=0.2, batch_size=16, num_workers=0,
                  augment=Augmentation(), image_size=48)
    device_dm, cpu_dm = CIFARDataModule(**kwargs, gpu_pipeline=True), CIFARDataModule(**kwargs)
    device_dm.setup("fit")
    cpu_dm.setup("fit")
    cpu_images, _ = next(iter(cpu_dm.val_dataloader()))
    device_images, _ = next(iter(device_dm.val_dataloader()))
    assert cpu_images.shape == device_images.shape == (16, 3, 48, 48)  # what training crops to, not CIFAR's 32
    torch.testing.assert_close(device_images, cpu_images, atol=0.05, rtol=0)  # same bilinear upscale


def test_predict_with_the_gpu_pipeline_writes_every_test_image(cifar_root, tmp_path):
    dm = CIFARDataModule(root=str(cifar_root), verify_checksums=False, val_fraction=0.2, batch_size=16,
                         num_workers=0, augment=Augmentation(), gpu_pipeline=True)
    model = ConvMixerClassifier(dim=8, depth=1, kernel_size=3, patch_size=4, num_classes=10, image_size=32,
                                class_names=dm.class_names)  # metadata flows data -> model (the CLI links it)
    writer = PredictionWriter(output=str(tmp_path / "predictions.csv"), top_k=2)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[writer])
    trainer.predict(model, datamodule=dm, return_predictions=False)
    with open(tmp_path / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["index"]) for row in rows] == list(range(len(dm.test_set)))
    assert [row["target"] for row in rows] == [dm.class_names[int(t)] for t in dm.test_set.targets]


def test_normalize_matches_torchvision_and_builds_its_statistics_once():
    normalize = Normalize(CIFAR_MEAN, CIFAR_STD)
    images = torch.rand(4, 3, 8, 8)
    torch.testing.assert_close(normalize(images), v2.Normalize(CIFAR_MEAN, CIFAR_STD)(images))
    made = dict(normalize._tensors)
    normalize(torch.rand(2, 3, 8, 8))
    assert normalize._tensors.keys() == made.keys() == {(images.device, torch.float32)}
    assert all(a is b for a, b in zip(normalize._tensors[images.device, torch.float32],
                                      made[images.device, torch.float32], strict=True))  # no new copy per batch
