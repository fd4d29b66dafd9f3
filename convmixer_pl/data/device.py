"""A device-resident image pipeline: a whole split held where the model runs, augmented in batches there.

The uint8 images (N, C, H, W) are copied to the device once; each batch is gathered by index, then cropped, flipped,
RandAugment-ed, colour-jittered, normalised and erased with batched tensor operations: no per-image Python work and
no host-to-device copies in the training loop. The random parameters follow torchvision's v2 `RandomResizedCrop`,
`RandomHorizontalFlip` and `RandomErasing` draw for draw (ten tries, the same fallbacks), and `RandAugment` and
`ColorJitter` in law, value for value per image (`batched_ops`). One difference: crops are resized bilinearly
without antialiasing: torchvision's output when a crop is enlarged (always for CIFAR at its own size), slightly
sharper when one is shrunk, and at most one uint8 level from torchvision's fixed-point uint8 crop.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Sampler
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from ..preprocessing import DataConfig, DataError, Normalize
from ..resume import derive_seed
from .augment import Augmentation
from .batched_ops import BatchColorJitter, BatchRandAugment


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device) * (high - low) + low


def _randint_below(upper: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One integer in [0, upper) per element of `upper` (a positive integer tensor)."""
    draw = torch.rand(upper.shape, generator=generator, device=upper.device)
    return (draw * upper).floor().long().clamp_max(upper - 1)


def _tries(n: int, area: int, scale: Sequence[float], ratio: Sequence[float], generator: torch.Generator,
           tries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's tries at a box, drawn for all images at once: (n, tries) of round(sqrt(target area * aspect))
    and round(sqrt(target area / aspect)), the area drawn first, then the log-uniform aspect."""
    target = area * _uniform((n, tries), scale[0], scale[1], generator)
    aspect = torch.exp(_uniform((n, tries), math.log(ratio[0]), math.log(ratio[1]), generator))
    return torch.round(torch.sqrt(target * aspect)).long(), torch.round(torch.sqrt(target / aspect)).long()


def _first_fit(valid: torch.Tensor, h: torch.Tensor, w: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image, the sides of the first try that `valid` accepts, and whether there was one."""
    first = valid.int().argmax(dim=1, keepdim=True)
    return h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1), valid.any(dim=1)


def sample_crops(n: int, height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                 generator: torch.Generator, tries: int = 10) -> torch.Tensor:
    """`v2.RandomResizedCrop`'s boxes for `n` images: a (n, 4) long tensor of top, left, height, width."""
    w, h = _tries(n, height * width, scale, ratio, generator, tries)  # torchvision: w from * aspect
    h, w, found = _first_fit((w > 0) & (w <= width) & (h > 0) & (h <= height), h, w)
    # no try fitted: torchvision's central crop, clamped to the ratio range
    in_ratio = width / height
    h = torch.where(found, h, round(width / min(ratio)) if in_ratio < min(ratio) else height)
    w = torch.where(found, w, round(height * max(ratio)) if in_ratio > max(ratio) else width)
    top = torch.where(found, _randint_below(height - h + 1, generator), (height - h) // 2)
    left = torch.where(found, _randint_below(width - w + 1, generator), (width - w) // 2)
    return torch.stack([top, left, h, w], dim=1)


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Crop each float image to its box (top, left, height, width) and resize it bilinearly to `size`.

    The same as `F.interpolate(crop, mode="bilinear", align_corners=False)` per image (sample positions clamped
    to the crop, so its edge pixels repeat), done for the whole batch with one `grid_sample`; `flip` (bool per
    image) mirrors the result horizontally by mirroring the sample positions.
    """
    n, _, height, width = images.shape
    top, left, h, w = (t.to(images.dtype)[:, None] for t in boxes.unbind(1))
    steps = torch.arange(size, device=images.device, dtype=images.dtype)[None, :] + 0.5
    # source pixel centres, clamped to the crop like interpolate clamps to the image it is given
    xs = left + torch.minimum(torch.clamp(steps * w / size - 0.5, min=0), w - 1)
    ys = top + torch.minimum(torch.clamp(steps * h / size - 0.5, min=0), h - 1)
    if flip is not None:
        xs = torch.where(flip[:, None], xs.flip(1), xs)
    gx = (2 * xs + 1) / width - 1  # grid_sample's coordinates for align_corners=False
    gy = (2 * ys + 1) / height - 1
    grid = torch.stack([gx[:, None, :].expand(n, size, size), gy[:, :, None].expand(n, size, size)], dim=-1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def sample_erasing(n: int, height: int, width: int, p: float, scale: Sequence[float], ratio: Sequence[float],
                   generator: torch.Generator, tries: int = 10) -> torch.Tensor:
    """`v2.RandomErasing`'s boxes for `n` images: (n, 4) top, left, height, width; height 0 means not erased."""
    apply = torch.rand(n, generator=generator, device=generator.device) < p
    h, w = _tries(n, height * width, scale, ratio, generator, tries)  # torchvision: h from * aspect here
    h, w, found = _first_fit((h < height) & (w < width), h, w)
    erase = apply & found  # no try fitted: the image is left as it is, as in torchvision
    top = _randint_below(height - h + 1, generator)
    left = _randint_below(width - w + 1, generator)
    return torch.stack([top, left, h, w], dim=1) * erase[:, None]


def erase(images: torch.Tensor, boxes: torch.Tensor, value: float | None = 0.0,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill each box with `value`, or with standard normal noise when `value` is None (torchvision's "random")."""
    _, _, height, width = images.shape
    top, left, h, w = (t[:, None, None, None] for t in boxes.unbind(1))
    rows = torch.arange(height, device=images.device)[None, None, :, None]
    cols = torch.arange(width, device=images.device)[None, None, None, :]
    mask = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    if value is None:
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        return torch.where(mask, noise, images)
    return images.masked_fill(mask, value)


class BatchAugment:
    """Batched RandomResizedCrop -> RandomHorizontalFlip -> RandAugment -> ColorJitter -> to float in [0, 1] ->
    Normalize -> RandomErasing: the CPU pipeline's order and parameters (`ra_num_ops`, `color_jitter`, `erase_prob`
    0 turn steps off). With RandAugment or ColorJitter on, the crop is rounded to integers, as torchvision's uint8
    crop is, for their uint8 kernels. `erase_value` None fills with normal noise (torchvision's `value="random"`).
    """

    @classmethod
    def from_augmentation(cls, augment: Augmentation, config: DataConfig) -> BatchAugment:
        """The device pipeline's form of `augment` for data of `config`; what it cannot do is refused in one line."""
        if augment.interpolation != "bilinear":
            raise DataError(f"data.augment.interpolation {augment.interpolation!r}: data.device_pipeline crops with "
                            "bilinear sampling only; set data.augment.interpolation: bilinear, or "
                            "data.device_pipeline: false for the per-image pipeline")
        return cls(augment.crop_size or config.image_size, config.mean, config.std, augment.scale, augment.ratio,
                   augment.hflip, erase_prob=augment.re_prob,
                   erase_value=None if augment.re_mode == "pixel" else 0.0, ra_num_ops=augment.ra_num_ops,
                   ra_magnitude=augment.ra_magnitude, ra_magnitude_bins=augment.ra_magnitude_bins,
                   ra_interpolation=augment.ra_interpolation, color_jitter=augment.color_jitter)

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float],
                 scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: float = 0.5,
                 erase_prob: float = 0.0, erase_value: float | None = 0.0, ra_num_ops: int = 0,
                 ra_magnitude: int = 9, ra_magnitude_bins: int = 31, ra_interpolation: str = "nearest",
                 color_jitter: float = 0.0) -> None:
        self.image_size, self.scale, self.ratio, self.hflip = image_size, tuple(scale), tuple(ratio), hflip
        self.randaugment = (BatchRandAugment(ra_num_ops, ra_magnitude, ra_magnitude_bins, ra_interpolation)
                            if ra_num_ops > 0 else None)
        self.color_jitter = BatchColorJitter(color_jitter, color_jitter, color_jitter) if color_jitter > 0 else None
        self.normalize = Normalize(mean, std)
        self.erase_prob, self.erase_value = erase_prob, erase_value

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, height, width = images.shape
        boxes = sample_crops(n, height, width, self.scale, self.ratio, generator)
        flip = torch.rand(n, generator=generator, device=images.device) < self.hflip
        if self.randaugment is None and self.color_jitter is None:
            out = resized_crop(images.float() / 255, boxes, self.image_size, flip)
        else:  # on uint8 values, as torchvision's per-image pipeline
            out = resized_crop(images.float(), boxes, self.image_size, flip).round_()
            if self.randaugment is not None:
                out = self.randaugment(out, generator)
            if self.color_jitter is not None:
                out = self.color_jitter(out, generator)
            out = out.mul_(1.0 / 255)  # v2.ToDtype(float32, scale=True)
        out = self.normalize(out)
        if self.erase_prob > 0:
            boxes = sample_erasing(n, self.image_size, self.image_size, self.erase_prob, (0.02, 0.33), (0.3, 3.3),
                                   generator)  # torchvision's scale and ratio, as the per-image pipeline's
            out = erase(out, boxes, self.erase_value, generator)
        return out


class DeviceLoader:
    """Batches of (float images, long targets) from a uint8 split held on `device` (`data.device_pipeline`).

    Shuffling and sharding come from torchdata's `StatefulDistributedSampler` (seeded, one shard per process, new
    order per epoch, able to skip the batches a resumed epoch already trained on) unless `sampler` is given;
    Lightning calls its `set_epoch` as for a `DataLoader`. Augmentation draws from a generator on the device,
    reseeded from (seed, epoch, rank, batch), so a resumed epoch draws what the uninterrupted one would have.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, batch_size: int, device: torch.device | str,
                 transform: BatchAugment | Normalize, shuffle: bool = False, drop_last: bool = False,
                 seed: int = 0, num_replicas: int = 1, rank: int = 0, sampler: Sampler | None = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"DeviceLoader needs uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.targets = targets.to(self.device, torch.long)
        self.batch_size, self.drop_last, self.seed, self.rank = batch_size, drop_last, seed, rank
        self.transform = transform
        self.sampler = sampler if sampler is not None else StatefulDistributedSampler(
            range(len(self.targets)), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.batch_sampler = None  # Lightning inspects loaders that have a `sampler` like DataLoaders
        self.generator = torch.Generator(device=self.device)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # a generator: its body starts at the first batch, after Lightning's `sampler.set_epoch`
        epoch = getattr(self.sampler, "epoch", 0)
        indices = list(self.sampler)
        first = (len(self.sampler) - len(indices)) // self.batch_size  # batches a resumed epoch skips
        order = torch.as_tensor(indices, dtype=torch.long).to(self.device)
        for batch in range(first, len(self)):
            index = order[(batch - first) * self.batch_size:(batch - first + 1) * self.batch_size]
            images = self.images.index_select(0, index)
            if isinstance(self.transform, BatchAugment):
                self.generator.manual_seed(derive_seed(self.seed, epoch, self.rank, batch))
                images = self.transform(images, self.generator)
            else:
                images = self.transform(images)
            yield images, self.targets.index_select(0, index)
