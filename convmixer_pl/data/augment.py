"""Image pipelines of the paper's recipes, built from torchvision.transforms.v2, and their options.

Training, per image: RandomResizedCrop -> horizontal flip -> RandAugment -> ColorJitter -> float + normalize ->
RandomErasing (the order of the CIFAR-10 script and of timm's ImageNet pipeline); per batch, on the device: MixUp or
CutMix (`Augmentation.batch_mixer`). Evaluation is the data config's. `Augmentation` holds every training option
(`data.augment.*`); each data module has its own defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torchvision.transforms import v2

from ..preprocessing import DataConfig, DataError


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation; a step whose strength is 0 is left out.

    Args:
        crop_size: RandomResizedCrop's output size, the training image size; None: `data.image_size`, which
            evaluation uses. Smaller crops train faster, and testing above the crop size suits networks trained on
            random-resized crops (FixRes, Touvron et al. 2019).
        scale: RandomResizedCrop's range of the crop's area, as a fraction of the image's.
        ratio: RandomResizedCrop's range of the crop's aspect ratio.
        hflip: Probability of a horizontal flip.
        interpolation: Crop resampling; `random`: bilinear or bicubic per image (timm's `--train-interpolation`).
        ra_num_ops: RandAugment operations per image (0: off).
        ra_magnitude: RandAugment magnitude, out of `ra_magnitude_bins - 1`: torchvision's default of 31 bins is
            what the CIFAR-10 script used; timm's `m9` means 9/10, i.e. `ra_magnitude_bins: 11`.
        ra_magnitude_bins: RandAugment magnitude bins.
        ra_interpolation: Resampling of RandAugment's geometric operations (torchvision's default `nearest` in the
            CIFAR-10 script; timm: bilinear or bicubic).
        color_jitter: ColorJitter strength for brightness, contrast and saturation (0: off).
        re_prob: RandomErasing probability (0: off).
        re_mode: RandomErasing fill: `const` fills with 0 after normalization (the CIFAR-10 script), `pixel` with
            per-pixel normal noise (timm's `--remode pixel`).
        mixup_alpha: MixUp's Beta(alpha, alpha) (0: off).
        cutmix_alpha: CutMix's Beta(alpha, alpha) (0: off).
        mix_switch_prob: With both on, the probability of CutMix rather than MixUp for a batch.
        mix_prob: Probability of mixing a batch at all.
    """

    crop_size: int | None = None
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    interpolation: Literal["bilinear", "bicubic", "random"] = "bilinear"
    ra_num_ops: int = 0
    ra_magnitude: int = 9
    ra_magnitude_bins: int = 31
    ra_interpolation: Literal["nearest", "bilinear"] = "nearest"  # torchvision's tensor RandAugment has no bicubic
    color_jitter: float = 0.0
    re_prob: float = 0.0
    re_mode: Literal["const", "pixel"] = "const"
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_switch_prob: float = 0.5
    mix_prob: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", tuple(self.scale))
        object.__setattr__(self, "ratio", tuple(self.ratio))
        if self.crop_size is not None and self.crop_size <= 0:
            raise DataError(f"data.augment.crop_size must be positive (or null: data.image_size), got {self.crop_size}")
        if not (0 < self.scale[0] <= self.scale[1] <= 1 and 0 < self.ratio[0] <= self.ratio[1]):
            raise DataError(f"data.augment.scale {self.scale} must be 0 < low <= high <= 1 and data.augment.ratio "
                             f"{self.ratio} 0 < low <= high")
        if self.ra_num_ops < 0 or self.ra_magnitude_bins < 2 or not 0 <= self.ra_magnitude < self.ra_magnitude_bins:
            raise DataError(f"data.augment.ra_num_ops ({self.ra_num_ops}) must be >= 0 and data.augment.ra_magnitude "
                             f"({self.ra_magnitude}) in [0, data.augment.ra_magnitude_bins - 1 = "
                             f"{self.ra_magnitude_bins - 1}]")
        if self.ra_interpolation not in ("nearest", "bilinear"):
            raise DataError(f"data.augment.ra_interpolation {self.ra_interpolation!r}: torchvision's RandAugment on "
                            "tensors resamples with nearest or bilinear only; set one of them")
        for name in ("color_jitter", "mixup_alpha", "cutmix_alpha"):
            if getattr(self, name) < 0:
                raise DataError(f"data.augment.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.re_prob <= 1 or self.re_mode not in ("const", "pixel"):
            raise DataError(f"data.augment.re_prob ({self.re_prob}) must be in [0, 1] and data.augment.re_mode "
                             f"({self.re_mode!r}) 'const' or 'pixel'")
        for name in ("hflip", "mix_switch_prob", "mix_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise DataError(f"data.augment.{name} must be in [0, 1], got {getattr(self, name)}")

    def train_transform(self, config: DataConfig) -> v2.Compose:
        """The per-image training pipeline for data of `config`; its crops are `crop_size`, else the image size."""
        def crop(mode: str) -> v2.RandomResizedCrop:
            return v2.RandomResizedCrop(self.crop_size or config.image_size, scale=self.scale, ratio=self.ratio,
                                        interpolation=v2.InterpolationMode(mode), antialias=True)

        steps = [v2.ToImage(), v2.RandomChoice([crop("bilinear"), crop("bicubic")])
                 if self.interpolation == "random" else crop(self.interpolation)]
        if self.hflip > 0:
            steps.append(v2.RandomHorizontalFlip(self.hflip))
        if self.ra_num_ops > 0:
            steps.append(v2.RandAugment(num_ops=self.ra_num_ops, magnitude=self.ra_magnitude,
                                        num_magnitude_bins=self.ra_magnitude_bins,
                                        interpolation=v2.InterpolationMode(self.ra_interpolation)))
        if self.color_jitter > 0:
            c = self.color_jitter
            steps.append(v2.ColorJitter(brightness=c, contrast=c, saturation=c))
        steps.append(config.batch_transform())
        if self.re_prob > 0:
            steps.append(v2.RandomErasing(p=self.re_prob, value="random" if self.re_mode == "pixel" else 0))
        return v2.Compose(steps)

    def batch_mixer(self, num_classes: int) -> v2.Transform | None:
        """MixUp/CutMix on a whole batch `(images, labels) -> (images, soft labels)`, or None when both are off.

        timm's semantics (the paper's `--mixup 0.5 --cutmix 0.5`): with both on, CutMix with probability
        `mix_switch_prob`, else MixUp; either applied with probability `mix_prob`. Label smoothing is left to the
        loss (`F.cross_entropy(..., label_smoothing)` on mixed one-hot targets gives timm's smoothed ones).
        """
        mixup = v2.MixUp(alpha=self.mixup_alpha, num_classes=num_classes) if self.mixup_alpha > 0 else None
        cutmix = v2.CutMix(alpha=self.cutmix_alpha, num_classes=num_classes) if self.cutmix_alpha > 0 else None
        if mixup and cutmix:
            mixup = v2.RandomChoice([mixup, cutmix], p=[1 - self.mix_switch_prob, self.mix_switch_prob])
        mixer = mixup or cutmix
        if mixer is None or self.mix_prob >= 1:
            return mixer
        return v2.RandomApply([mixer], p=self.mix_prob)


# RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) and flip, nothing else: the image-folder default
CROP_AND_FLIP = Augmentation()
# The CIFAR-10 script's defaults: RandomResizedCrop(scale 0.75-1, ratio 1), flip, RandAugment(n 1, m 8 of 31 bins),
# ColorJitter 0.1, RandomErasing 0.25 filled with 0.
CIFAR_SCRIPT = Augmentation(scale=(0.75, 1.0), ratio=(1.0, 1.0), ra_num_ops=1, ra_magnitude=8, color_jitter=0.1,
                            re_prob=0.25)

