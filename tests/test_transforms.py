"""Augmentation: each v2 step is built with its configured parameters and does what it says."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from convmixer_pl.data import (
    CIFAR_MEAN,
    CIFAR_STD,
    Augmentation,
    CIFARDataModule,
    DataError,
    ImageFolderDataModule,
)
from convmixer_pl.module import ConvMixerClassifier
from convmixer_pl.preprocessing import DataConfig, Normalize

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def train_transform(image_size: int, mean, std, **augment) -> v2.Compose:
    return Augmentation(**augment).train_transform(DataConfig(image_size, mean=mean, std=std))


def batch_mixer(num_classes: int, **augment):
    return Augmentation(**augment).batch_mixer(num_classes)


def steps(pipeline: v2.Compose) -> dict[type, v2.Transform]:
    return {type(t): t for t in pipeline.transforms}


def test_cifar_defaults_are_the_cifar10_script(cifar_root):
    dm = CIFARDataModule(root=str(cifar_root), verify_checksums=False, val_fraction=0, num_workers=0)
    dm.setup("fit")
    pipeline = dm.train_set.transform
    assert [type(t) for t in pipeline.transforms] == [
        v2.ToImage, v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.RandAugment, v2.ColorJitter, Normalize,
        v2.RandomErasing]
    s = steps(pipeline)
    crop = s[v2.RandomResizedCrop]
    assert tuple(crop.size) == (32, 32) and crop.scale == (0.75, 1.0) and crop.ratio == (1.0, 1.0)
    assert s[v2.RandomHorizontalFlip].p == 0.5
    ra = s[v2.RandAugment]
    assert (ra.num_ops, ra.magnitude, ra.num_magnitude_bins) == (1, 8, 31)
    assert ra.interpolation == v2.InterpolationMode.NEAREST
    assert s[v2.ColorJitter].brightness == (0.9, 1.1) and s[v2.ColorJitter].saturation == (0.9, 1.1)
    assert s[v2.ColorJitter].hue is None
    assert s[Normalize].mean == CIFAR_MEAN and s[Normalize].std == CIFAR_STD  # to float in [0, 1], normalised
    assert s[v2.RandomErasing].p == 0.25 and s[v2.RandomErasing].value == [0.0]
    assert dm.mixer is None
    # evaluation: the 32 px images as they are (the resize to image_size 32 leaves them untouched), normalised
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    as_they_are = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(CIFAR_MEAN, CIFAR_STD)])(image)
    assert torch.equal(dm.test_set.transform(image), as_they_are)


def test_configured_parameters_reach_the_pipeline(cifar_root):
    dm = CIFARDataModule(root=str(cifar_root), verify_checksums=False, val_fraction=0, num_workers=0,
                         augment=Augmentation(scale=(1.0, 1.0), ra_num_ops=2, ra_magnitude=12, color_jitter=0.2,
                                              re_prob=0.2, re_mode="pixel", mixup_alpha=0.8, cutmix_alpha=1.0,
                                              mix_switch_prob=0.3, mix_prob=0.9))
    dm.setup("fit")
    s = steps(dm.train_set.transform)
    assert s[v2.RandomResizedCrop].scale == (1.0, 1.0)
    assert (s[v2.RandAugment].num_ops, s[v2.RandAugment].magnitude) == (2, 12)
    assert s[v2.ColorJitter].contrast == (0.8, 1.2)
    assert s[v2.RandomErasing].p == 0.2 and s[v2.RandomErasing].value is None  # None: noise
    assert isinstance(dm.mixer, v2.RandomApply) and dm.mixer.p == 0.9
    choice = dm.mixer.transforms[0]
    assert isinstance(choice, v2.RandomChoice) and choice.p == pytest.approx([0.7, 0.3])
    mixup, cutmix = choice.transforms
    assert isinstance(mixup, v2.MixUp) and isinstance(cutmix, v2.CutMix)
    assert (mixup.alpha, cutmix.alpha, mixup.num_classes) == (0.8, 1.0, 10)


def test_steps_switched_off_are_absent():
    pipeline = train_transform(32, CIFAR_MEAN, CIFAR_STD, hflip=0.0)
    assert [type(t) for t in pipeline.transforms] == [v2.ToImage, v2.RandomResizedCrop, Normalize]
    assert batch_mixer(10) is None


def test_effects_of_each_step():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(CIFAR_MEAN, CIFAR_STD)])
    # scale (1, 1) and ratio 1 on a square image crop nothing; flip with p=1 mirrors exactly
    flipped = train_transform(32, CIFAR_MEAN, CIFAR_STD, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0)(image)
    assert torch.allclose(flipped, normalize(image.flip(-1)))
    # RandomErasing with p=1: a rectangle of zeros (const) or of noise (pixel), the rest untouched
    for mode in ("const", "pixel"):
        erased = train_transform(32, CIFAR_MEAN, CIFAR_STD, scale=(1.0, 1.0), hflip=0.0, re_prob=1.0,
                                 re_mode=mode)(image)
        changed = ~torch.isclose(erased, normalize(image))
        assert 0.02 * 32 * 32 * 3 * 0.5 < changed.sum() <= 32 * 32 * 3 / 3 + 3
        if mode == "const":
            assert (erased[changed] == 0).all()
        else:
            assert erased[changed].std() > 0.5  # standard-normal noise, not a constant
    # ColorJitter and RandAugment change pixel values; RandomResizedCrop with a small scale zooms in
    jittered = train_transform(32, CIFAR_MEAN, CIFAR_STD, scale=(1.0, 1.0), hflip=0.0, color_jitter=0.5)(image)
    assert not torch.allclose(jittered, normalize(image))
    ra = train_transform(32, CIFAR_MEAN, CIFAR_STD, scale=(1.0, 1.0), hflip=0.0, ra_num_ops=3, ra_magnitude=20)
    assert sum(not torch.allclose(ra(image), normalize(image)) for _ in range(5)) >= 4
    zoom = train_transform(16, CIFAR_MEAN, CIFAR_STD, scale=(0.1, 0.1), ratio=(1.0, 1.0), hflip=0.0)(image)
    assert zoom.shape == (3, 16, 16)


def test_random_train_interpolation_uses_both_kernels():
    pipeline = train_transform(224, (0.5,) * 3, (0.5,) * 3, interpolation="random", ra_num_ops=2,
                               ra_magnitude_bins=11, ra_interpolation="bilinear")
    choice = pipeline.transforms[1]
    assert isinstance(choice, v2.RandomChoice)
    assert [t.interpolation for t in choice.transforms] == [v2.InterpolationMode.BILINEAR,
                                                           v2.InterpolationMode.BICUBIC]
    assert steps(pipeline)[v2.RandAugment].num_magnitude_bins == 11


def test_image_folder_eval_resizes_by_crop_pct_then_center_crops(image_folder):
    dm = ImageFolderDataModule(root=str(image_folder), image_size=24, crop_pct=0.96, interpolation="bicubic",
                               num_workers=0)
    dm.setup("validate")
    assert dm.data_config.crop_pct == 0.96 and dm.data_config.interpolation == "bicubic"
    resize, crop = dm.val_set.transform.transforms[0].steps.transforms
    assert isinstance(resize, v2.Resize) and list(resize.size) == [25]
    assert resize.interpolation == v2.InterpolationMode.BICUBIC
    assert isinstance(crop, v2.CenterCrop) and tuple(crop.size) == (24, 24)
    image, _ = dm.val_set[0]
    pil = Image.open(dm.val_set.samples[0][0]).convert("RGB")
    expected = v2.functional.center_crop(
        v2.functional.resize(v2.functional.to_image(pil), [25], v2.InterpolationMode.BICUBIC, antialias=True), [24])
    expected = v2.functional.normalize(v2.functional.to_dtype(expected, torch.float32, scale=True),
                                       list(dm.data_config.mean), list(dm.data_config.std))
    assert torch.equal(image, expected)


def test_mixup_and_cutmix_both_happen_with_their_switch():
    """Sample i is constant i: MixUp gives one blended value per sample, CutMix a patch of another sample."""
    images = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 3, 16, 16).contiguous()
    labels = torch.arange(8)
    mixer = batch_mixer(8, mixup_alpha=0.5, cutmix_alpha=0.5)
    torch.manual_seed(0)
    kinds = {"mixup": 0, "cutmix": 0}
    for _ in range(40):
        mixed, soft = mixer(images, labels)
        assert soft.shape == (8, 8) and torch.allclose(soft.sum(1), torch.ones(8))
        values = mixed[0].unique()
        if len(values) == 1 and values.item() not in range(8):
            kinds["mixup"] += 1
            lam = soft[0, 0].item()  # MixUp pairs each sample with its neighbour in the batch
            assert values.item() == pytest.approx(lam * 0 + (1 - lam) * 7, abs=1e-5)
        elif set(values.tolist()) <= set(range(8)):
            kinds["cutmix"] += 1
            # the label weight is the area each sample keeps
            assert soft[0, 0].item() == pytest.approx((mixed[0, 0] == 0).float().mean().item(), abs=1e-6)
    assert kinds["mixup"] >= 8 and kinds["cutmix"] >= 8


def test_soft_target_loss_with_smoothing_equals_timm():
    from timm.data.mixup import mixup_target
    from timm.loss import SoftTargetCrossEntropy

    torch.manual_seed(0)
    logits, target, lam = torch.randn(6, 5), torch.randint(0, 5, (6,)), 0.3
    mixed = lam * F.one_hot(target, 5).float() + (1 - lam) * F.one_hot(target.flip(0), 5).float()
    ours = F.cross_entropy(logits, mixed, label_smoothing=0.1)
    theirs = SoftTargetCrossEntropy()(logits, mixup_target(target, 5, lam, smoothing=0.1))
    assert torch.allclose(ours, theirs, atol=1e-6)


class RecordTargets(ConvMixerClassifier):
    seen: dict

    def training_step(self, batch, batch_idx):
        self.seen.setdefault("train", []).append(batch[1])
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.seen.setdefault("val", []).append(batch[1])
        return super().validation_step(batch, batch_idx)


def test_training_batches_are_mixed_and_validation_batches_are_not(tmp_path, cifar_root):
    dm = CIFARDataModule(root=str(cifar_root), verify_checksums=False, val_fraction=0.08, num_workers=0,
                         batch_size=8, pin_memory=False, augment=Augmentation(mixup_alpha=0.5, cutmix_alpha=0.5))
    model = RecordTargets(dim=8, depth=1, kernel_size=3, patch_size=8, num_classes=10)
    model.seen = {}
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    assert len(model.seen["train"]) == 2 and len(model.seen["val"]) == 1
    for soft in model.seen["train"]:
        assert soft.shape == (8, 10) and soft.dtype == torch.float32 and (soft.max(1).values < 1).any()
    assert model.seen["val"][0].dtype == torch.int64 and model.seen["val"][0].ndim == 1


def test_mixed_batches_with_the_model_summary_on(tmp_path, cifar_root):
    """Lightning's model summary passes the model's example input, a lone tensor, through the data module's
    batch hook while training: it is not a batch to mix."""
    dm = CIFARDataModule(root=str(cifar_root), verify_checksums=False, val_fraction=0.08, num_workers=0,
                         batch_size=8, pin_memory=False, augment=Augmentation(mixup_alpha=0.5, cutmix_alpha=0.5))
    model = ConvMixerClassifier(dim=8, depth=1, kernel_size=3, patch_size=8, data_config=dm.data_config)
    assert model.example_input_array.shape == (1, 3, 32, 32)  # the summary's input sizes and FLOPs
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=True,
                        num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    assert trainer.global_step == 2


def test_bad_augmentation_values_name_their_key():
    with pytest.raises(DataError, match="data.augment.re_prob"):
        Augmentation(re_prob=1.5)
    with pytest.raises(DataError, match="data.augment.mixup_alpha"):
        Augmentation(mixup_alpha=-1)
    with pytest.raises(DataError, match="data.augment.ra_magnitude"):
        Augmentation(ra_magnitude=31)
    with pytest.raises(DataError, match="data.augment.scale"):
        Augmentation(scale=(0.9, 0.5))


def test_crop_size_sets_the_training_size_of_both_pipelines_and_evaluation_keeps_image_size(cifar_root):
    from convmixer_pl.data.device import BatchAugment

    augment = Augmentation(crop_size=28, scale=(0.75, 1.0), ratio=(1.0, 1.0))
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    assert augment.train_transform(DataConfig(32, mean=CIFAR_MEAN, std=CIFAR_STD))(image).shape == (3, 28, 28)
    batched = BatchAugment.from_augmentation(augment, DataConfig(32, mean=CIFAR_MEAN, std=CIFAR_STD))
    assert batched(image[None].repeat(4, 1, 1, 1), torch.Generator().manual_seed(0)).shape == (4, 3, 28, 28)
    dm = CIFARDataModule(root=str(cifar_root), verify_checksums=False, val_fraction=0.1, batch_size=8, num_workers=0,
                         augment=augment)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))[0].shape == (8, 3, 28, 28)
    assert next(iter(dm.val_dataloader()))[0].shape == (8, 3, 32, 32)  # evaluated at data.image_size
    with pytest.raises(DataError, match="data.augment.crop_size"):
        Augmentation(crop_size=0)
