"""The evaluation preprocessing of a model, as one object: `DataConfig`, in timm's `pretrained_cfg` terms.

A data module exposes it (`data_config`), the CLI links it into the model, the model stores it with its weights,
and validate, test, predict, serve and every export read it from there. Its transform has two halves, which run in
different places:
- `image_transform()`, per image: to a uint8 tensor, resize the short side to `image_size / crop_pct`, center-crop
  `image_size` (in loader workers, in the server's HTTP process, or once at set-up for splits held in memory);
- `batch_transform()`, per batch (or per image): to float in [0, 1], normalise (on the model's device).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torchvision.transforms import v2

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # the mode images are read in, by the model's input channels
Interpolation = Literal["bilinear", "bicubic"]


class DataError(ValueError):
    """Bad data on disk or in the config (a data config that cannot describe an image pipeline, among others): the
    message names the path or key and how to fix it."""


@dataclass(frozen=True)
class DataConfig:
    """How images are prepared for the model, and what its outputs mean.

    Args:
        image_size: Height and width of the model's input.
        in_chans: Input channels: 1 (grey), 3 (RGB) or 4 (RGBA).
        mean: Per-channel normalisation mean.
        std: Per-channel normalisation std.
        crop_pct: Evaluation resize: the short side goes to image_size / crop_pct, then a center crop.
        interpolation: Evaluation resize interpolation.
        class_names: Class names, in label order.
    """

    image_size: int
    in_chans: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875  # timm's default
    interpolation: Interpolation = "bilinear"
    class_names: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for name in ("mean", "std", "class_names"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.in_chans not in PIL_MODES:
            raise DataError(f"in_chans {self.in_chans}: images are read as grey (1), RGB (3) or RGBA (4)")
        if not isinstance(self.image_size, int) or self.image_size <= 0:
            raise DataError(f"image_size must be a positive integer, got {self.image_size!r}")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans or min(self.std) <= 0:
            raise DataError(f"mean {self.mean} and std {self.std} need one value per channel "
                                     f"({self.in_chans}), std > 0")
        if not 0 < self.crop_pct <= 1:
            raise DataError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise DataError(f"interpolation must be bilinear or bicubic, got {self.interpolation!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | DataConfig | None) -> DataConfig | None:
        return values if values is None or isinstance(values, DataConfig) else cls(**values)

    def as_dict(self) -> dict[str, Any]:
        """Plain Python values (lists, not tuples): what checkpoints store and JSON holds."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def pil_mode(self) -> str:
        return PIL_MODES[self.in_chans]

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (self.in_chans, self.image_size, self.image_size)

    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's names for the evaluation preprocessing (what `timm.data.resolve_data_config` reads)."""
        return {"input_size": list(self.input_size), "mean": list(self.mean), "std": list(self.std),
                "crop_pct": self.crop_pct, "interpolation": self.interpolation}

    # -- the two halves of the evaluation transform -------------------------------------------------------------
    def image_transform(self) -> v2.Transform:
        """Per image (a PIL image or uint8 tensor, or a batch of uint8 tensors): uint8 (C, H, W) resized and
        center-cropped to image_size."""
        return ResizeAndCrop(self.image_size, self.crop_pct, self.interpolation)

    def batch_transform(self) -> Normalize:
        """uint8 images (C, H, W) or (N, C, H, W) -> normalised float32, on whatever device they are."""
        return Normalize(self.mean, self.std)

    def eval_transform(self) -> v2.Compose:
        """Both halves, for one image at a time (a per-image loader)."""
        return v2.Compose([self.image_transform(), self.batch_transform()])


class ResizeAndCrop(v2.Transform):
    """To a uint8 tensor, short side to `size / crop_pct`, center crop `size`; an image already at the size
    passes through (both steps would return it unchanged, at more cost than a small image's decode)."""

    def __init__(self, size: int, crop_pct: float, interpolation: str) -> None:
        super().__init__()
        self.size, self.resize_to = size, int(size / crop_pct)
        self.steps = v2.Compose([v2.Resize(self.resize_to, interpolation=v2.InterpolationMode(interpolation),
                                           antialias=True), v2.CenterCrop(size)])
        self.to_image = v2.ToImage()

    def forward(self, image):
        image = self.to_image(image) if not isinstance(image, torch.Tensor) else image
        if tuple(image.shape[-2:]) == (self.size, self.size) and self.resize_to == self.size:
            return image
        return self.steps(image)


class Normalize(torch.nn.Module):
    """uint8 -> float in [0, 1] -> `(x - mean) / std` per channel. The statistics become tensors once per device:
    made from Python numbers in every batch, they would be a host-to-device copy, which waits for queued GPU work."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.mean, self.std = tuple(mean), tuple(std)
        self._tensors: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float().mul_(1 / 255)
        if images.device not in self._tensors:
            self._tensors[images.device] = tuple(torch.tensor(v, device=images.device)[:, None, None]
                                                 for v in (self.mean, self.std))
        mean, std = self._tensors[images.device]
        return images.sub(mean).div_(std)
