"""Image pipelines of the paper's recipes, built from torchvision.transforms.v2.

Training, per image: RandomResizedCrop -> horizontal flip -> RandAugment -> ColorJitter -> float + normalize ->
RandomErasing (the order of the CIFAR-10 script and of timm's ImageNet pipeline). Per batch, after the transfer to
the device: MixUp or CutMix (`batch_mixer`). Evaluation: resize to `image_size / crop_pct`, center crop.
"""

from __future__ import annotations

from typing import Literal

import torch
from torchvision.transforms import v2

Interpolation = Literal["bilinear", "bicubic"]
TrainInterpolation = Literal["bilinear", "bicubic", "random"]
EraseMode = Literal["const", "pixel"]


def _mode(name: str | v2.InterpolationMode) -> v2.InterpolationMode:
    return name if isinstance(name, v2.InterpolationMode) else v2.InterpolationMode(name)


def train_transform(
    image_size: int,
    mean,
    std,
    scale=(0.08, 1.0),
    ratio=(3 / 4, 4 / 3),
    hflip: float = 0.5,
    interpolation: TrainInterpolation | v2.InterpolationMode = "bilinear",
    ra_num_ops: int = 0,
    ra_magnitude: int = 9,
    ra_magnitude_bins: int = 31,
    ra_interpolation: Literal["nearest", "bilinear", "bicubic"] = "nearest",
    color_jitter: float = 0.0,
    re_prob: float = 0.0,
    re_mode: EraseMode = "const",
) -> v2.Compose:
    """The per-image training pipeline; a step whose strength is 0 is left out.

    `interpolation="random"` picks bilinear or bicubic per image (timm's `--train-interpolation random`).
    RandAugment's strength is `ra_magnitude / (ra_magnitude_bins - 1)` of each op's maximum: torchvision's default of
    31 bins is what the CIFAR-10 script used; timm's `m9` means 9/10, i.e. `ra_magnitude_bins: 11`. Its geometric
    ops resample with `ra_interpolation` (torchvision's default `nearest` in the CIFAR-10 script; timm: bilinear or
    bicubic).
    RandomErasing `const` fills with 0 after normalization (the CIFAR-10 script), `pixel` with per-pixel normal noise
    (timm's `--remode pixel`).
    """
    if re_mode not in ("const", "pixel"):
        raise ValueError(f"re_mode must be 'const' or 'pixel', got {re_mode!r}")
    if interpolation == "random":
        crop = v2.RandomChoice([
            v2.RandomResizedCrop(image_size, scale=tuple(scale), ratio=tuple(ratio), interpolation=_mode(mode),
                                 antialias=True)
            for mode in ("bilinear", "bicubic")
        ])
    else:
        crop = v2.RandomResizedCrop(image_size, scale=tuple(scale), ratio=tuple(ratio),
                                    interpolation=_mode(interpolation), antialias=True)
    steps = [v2.ToImage(), crop]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if ra_num_ops > 0:
        steps.append(v2.RandAugment(num_ops=ra_num_ops, magnitude=ra_magnitude,
                                    num_magnitude_bins=ra_magnitude_bins, interpolation=_mode(ra_interpolation)))
    if color_jitter > 0:
        steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if re_prob > 0:
        steps.append(v2.RandomErasing(p=re_prob, value="random" if re_mode == "pixel" else 0))
    return v2.Compose(steps)


def eval_transform(image_size: int, mean, std, crop_pct: float = 1.0,
                   interpolation: Interpolation | v2.InterpolationMode = "bilinear") -> v2.Compose:
    """Resize the short side to `image_size / crop_pct` and center-crop `image_size` (a no-op for images already
    that size, such as CIFAR's 32 px ones at `image_size: 32`), then normalise."""
    return v2.Compose([v2.ToImage(),
                       v2.Resize(int(image_size / crop_pct), interpolation=_mode(interpolation), antialias=True),
                       v2.CenterCrop(image_size), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def batch_mixer(num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, switch_prob: float = 0.5,
                prob: float = 1.0) -> v2.Transform | None:
    """MixUp/CutMix on a whole batch `(images, labels) -> (images, soft labels)`, or None when both alphas are 0.

    timm's semantics (the paper's `--mixup 0.5 --cutmix 0.5`): with both on, CutMix is chosen with probability
    `switch_prob`, else MixUp; either is applied to a batch with probability `prob`. Label smoothing is left to the
    loss (`F.cross_entropy(..., label_smoothing)` on the mixed one-hot targets gives timm's smoothed mixed targets).
    """
    for name, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    for name, value in (("mix_switch_prob", switch_prob), ("mix_prob", prob)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    mixup = v2.MixUp(alpha=mixup_alpha, num_classes=num_classes) if mixup_alpha > 0 else None
    cutmix = v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes) if cutmix_alpha > 0 else None
    if mixup and cutmix:
        mixer = v2.RandomChoice([mixup, cutmix], p=[1 - switch_prob, switch_prob])
    else:
        mixer = mixup or cutmix
    if mixer is None:
        return None
    return mixer if prob >= 1 else v2.RandomApply([mixer], p=prob)
