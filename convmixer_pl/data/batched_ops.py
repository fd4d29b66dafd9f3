"""RandAugment and ColorJitter for whole batches, with torchvision.transforms.v2's semantics on uint8 images.

Images are float32 RGB tensors (N, 3, H, W) holding uint8 values. Each operation does the float32 arithmetic and
truncation of torchvision's uint8 kernel (or calls that kernel), so an image comes out as torchvision's would, value
for value (the tests compare every operation per image). Every image has its own operation and parameters, drawn for
the whole batch at once on the generator's device; on the CPU the images of one operation are transformed together
(the affine ones with one `grid_sample` of per-image matrices), elsewhere every operation runs on the whole batch
and `torch.where` keeps each image's own (no device-to-host synchronisation, more arithmetic).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from torchvision.transforms.v2.functional._geometry import _get_inverse_affine_matrix as inverse_affine_matrix

# torchvision's RandAugment operations, in the order of its `_AUGMENTATION_SPACE` (the index is the op's id here)
OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
       "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
SIGNED = frozenset(OPS[1:10])  # the ops whose magnitude gets a random sign


def _op_matrix(name: str, magnitude: float, height: int, width: int) -> list[float]:
    """The matrix torchvision's RandAugment resamples a geometric op with, from its own helper (else the identity)."""
    if name in ("ShearX", "ShearY"):  # sheared about the top-left corner (torchvision's center=[0, 0])
        shear = math.degrees(math.atan(magnitude))
        return inverse_affine_matrix([-width * 0.5, -height * 0.5], 0.0, [0.0, 0.0], 1.0,
                                     [shear, 0.0] if name == "ShearX" else [0.0, shear])
    if name in ("TranslateX", "TranslateY"):
        shift = [float(int(magnitude)), 0.0] if name == "TranslateX" else [0.0, float(int(magnitude))]
        return inverse_affine_matrix([0.0, 0.0], 0.0, shift, 1.0, [0.0, 0.0])
    if name == "Rotate":  # F.rotate: the angle taken modulo 360, and negated for the affine matrix
        return inverse_affine_matrix([0.0, 0.0], -(magnitude % 360), [0.0, 0.0], 1.0, [0.0, 0.0])
    return [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def affine(images: torch.Tensor, theta: torch.Tensor, mode: str = "nearest") -> torch.Tensor:
    """Resample each image with its own inverse matrix, as torchvision's tensor `affine`/`rotate` (fill 0, rounded):
    `theta` (N, 3, 2) is its matrix transposed and divided by half the image size, on the output's pixel centres."""
    n, _, height, width = images.shape
    base = torch.empty(1, height, width, 3, dtype=images.dtype, device=images.device)
    base[..., 0].copy_(torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, width, device=images.device))
    base[..., 1].copy_(torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, height,
                                      device=images.device).unsqueeze_(-1))
    base[..., 2].fill_(1)
    grid = base.view(1, height * width, 3).expand(n, -1, -1).bmm(theta).view(n, height, width, 2)
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False).round_()


def _as_images(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, 1, 1, 1)


def adjust_colour(images: torch.Tensor, kind: torch.Tensor, factor: torch.Tensor, alpha: torch.Tensor,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """torchvision's uint8 brightness (`kind` 0), contrast (1) or saturation (2), one kind and factor per image: its
    `_blend` of the image with black, its mean luma or its luma, `image * factor + other * alpha` (alpha: 1 - factor),
    clamped to [0, 255] and floored (what `.to(torch.uint8)` does there). `addcmul` adds `other * alpha` with one
    rounding, like torchvision's `add_(other, alpha=...)`. `out` may be `images`."""
    r, g, b = images.unbind(1)
    gray = r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze_(1).floor_()  # torchvision's luma, floored
    kind = _as_images(kind)
    # the luma, its mean or 0 per image: exact, as each image has one nonzero term
    other = torch.addcmul(gray.mean(dim=(-3, -2, -1), keepdim=True).mul_(kind == 1), gray, kind == 2)
    out = torch.mul(images, _as_images(factor), out=out)
    return out.addcmul_(other, _as_images(alpha)).clamp_(0, 255).floor_()


def adjust_sharpness(images: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """torchvision's: the interior blended (`alpha`: 1 - factor) with a 3x3 blur (1s around a 5, /13, rounded)."""
    n, c, height, width = images.shape
    if height <= 2 or width <= 2:
        return images
    a, b = 1.0 / 13.0, 5.0 / 13.0
    kernel = torch.tensor([[a, a, a], [a, b, a], [a, a, a]], dtype=images.dtype, device=images.device)
    blurred = F.conv2d(images, kernel.expand(c, 1, 3, 3), groups=c).round_()
    inner = images[..., 1:-1, 1:-1]
    out = images.clone()
    out[..., 1:-1, 1:-1] = torch.addcmul(inner, blurred.sub_(inner), _as_images(alpha)).clamp_(0, 255).floor_()
    return out


def posterize(images: torch.Tensor, bits: int) -> torch.Tensor:
    """Keep the `bits` high bits of each value (torchvision's `image & mask` on uint8)."""
    if bits >= 8:
        return images
    step = float(2 ** (8 - bits))
    return images.mul(1.0 / step).floor_().mul_(step)


def solarize(images: torch.Tensor, threshold: float) -> torch.Tensor:
    """torchvision's: the values at or above `threshold` inverted (compared in float32, as it compares)."""
    return torch.where(images >= threshold, 255.0 - images, images)


class BatchRandAugment:
    """`v2.RandAugment(num_ops, magnitude, num_magnitude_bins, interpolation)` on a batch of uint8-valued float
    images: per image and op slot, an op drawn uniformly from `OPS` and a sign (negative with probability 1/2) for
    the signed ones, at torchvision's magnitudes; fill 0 for the geometric ops. `Augmentation` checks the options."""

    def __init__(self, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31,
                 interpolation: str = "nearest") -> None:
        self.num_ops, self.magnitude, self.num_bins = num_ops, magnitude, num_magnitude_bins
        self.interpolation = interpolation
        values = dict(zip(OPS, self.magnitudes(1, 1), strict=True))  # these two do not depend on the size
        self.bits, self.threshold = int(values["Posterize"][0]), 255 * values["Solarize"][0]
        self._tables: dict[tuple[torch.device, int, int], tuple[torch.Tensor, ...]] = {}
        self._groups: tuple[tuple[int, int, Callable], ...] = (  # op ids first..last, and what they do
            (1, 5, self._geometric), (6, 8, self._colour), (9, 9, self._sharpness),
            (10, 10, lambda x, variant: posterize(x, self.bits)),
            (11, 11, lambda x, variant: solarize(x, self.threshold)),
            # torchvision's own kernels, exact on the uint8 values (and faster than batched float ones on the CPU)
            (12, 12, lambda x, variant: TF.autocontrast_image(x.to(torch.uint8)).float()),
            (13, 13, lambda x, variant: TF.equalize_image(x.to(torch.uint8)).float()))

    def magnitudes(self, height: int, width: int) -> list[tuple[float, float]]:
        """Per op (the order of `OPS`), the magnitude torchvision's RandAugment passes it with a positive and a negative
        sign: its `_AUGMENTATION_SPACE` value at `magnitude`, a Python float (0.0 for the ops without one)."""
        space = v2.RandAugment._AUGMENTATION_SPACE
        values = [space[name][0](self.num_bins, height, width) for name in OPS]
        values = [0.0 if bins is None else float(bins[self.magnitude]) for bins in values]
        return [(value, -value if name in SIGNED else value) for name, value in zip(OPS, values, strict=True)]

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The ops (num_ops, n), long ids into `OPS`, and their signs (num_ops, n), True for negative."""
        device = generator.device
        ops = torch.randint(len(OPS), (self.num_ops, n), generator=generator, device=device)
        negative = torch.rand((self.num_ops, n), generator=generator, device=device) <= 0.5  # torchvision's test
        return ops, negative

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """RandAugment on `images`, which it may overwrite (pass a copy to keep them)."""
        ops, negative = self.sample(images.shape[0], generator)
        for op, neg in zip(ops, negative, strict=True):
            images = self.apply(images, op, neg)
        return images

    def apply(self, images: torch.Tensor, op: torch.Tensor, negative: torch.Tensor,
              gather: bool | None = None) -> torch.Tensor:
        """One op per image: `op` (N,) ids into `OPS`, `negative` (N,) signs. `gather` (default: on the CPU)
        transforms only the images of each op, found with `nonzero`; else every op runs on the whole batch and
        `torch.where` picks (no synchronisation with the device). Gathering overwrites `images` and returns it."""
        variant = op * 2 + negative.long()  # the row of the tables
        gather = images.device.type == "cpu" if gather is None else gather
        out = images
        for first, last, fn in self._groups:
            chosen = (op >= first) & (op <= last)
            if gather:  # in place: each group reads only its own images, which no other group writes
                index = chosen.nonzero().squeeze(1)
                if len(index):
                    out.index_copy_(0, index, fn(images.index_select(0, index), variant.index_select(0, index)))
            else:
                out = torch.where(_as_images(chosen), fn(images, variant), out)
        return out

    def _table(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per (op, sign) row: the resampling matrix, transposed and rescaled as torchvision's `_affine_grid` does
        (V, 3, 2), the enhancement factor 1 + magnitude and 1 - factor (V,), each rounded as torchvision rounds them,
        and `adjust_colour`'s kind (V,). Made once per device and size: no host-to-device copy per batch."""
        _, _, height, width = images.shape
        key = (images.device, height, width)
        if key not in self._tables:
            rows = [(name, value) for name, pair in zip(OPS, self.magnitudes(height, width), strict=True)
                    for value in pair]
            theta = torch.tensor([_op_matrix(name, value, height, width) for name, value in rows],
                                 dtype=torch.float32).view(-1, 2, 3)
            theta = theta.transpose(1, 2).div_(torch.tensor([0.5 * width, 0.5 * height]))
            factor = torch.tensor([1.0 + value for _, value in rows], dtype=torch.float32)
            alpha = torch.tensor([1.0 - (1.0 + value) for _, value in rows], dtype=torch.float32)
            kind = torch.tensor([{"Contrast": 1, "Color": 2}.get(name, 0) for name, _ in rows])
            self._tables[key] = tuple(t.to(images.device) for t in (theta, factor, alpha, kind))
        return self._tables[key]

    def _geometric(self, images: torch.Tensor, variant: torch.Tensor) -> torch.Tensor:
        return affine(images, self._table(images)[0][variant], self.interpolation)

    def _colour(self, images: torch.Tensor, variant: torch.Tensor) -> torch.Tensor:
        _, factor, alpha, kind = self._table(images)
        return adjust_colour(images, kind[variant], factor[variant], alpha[variant])

    def _sharpness(self, images: torch.Tensor, variant: torch.Tensor) -> torch.Tensor:
        return adjust_sharpness(images, self._table(images)[2][variant])


class BatchColorJitter:
    """`v2.ColorJitter(brightness, contrast, saturation)` on a batch of uint8-valued float images: per image,
    factors uniform in [max(0, 1 - x), 1 + x] and the three adjustments in a random order (torchvision permutes them
    per call). A strength (>= 0, checked by `Augmentation`) of 0 leaves its adjustment out: factor 1, a no-op."""

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0) -> None:
        self.ranges = tuple((max(0.0, 1.0 - x), 1.0 + x) if x > 0 else (1.0, 1.0)
                            for x in (brightness, contrast, saturation))

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors (n, 3) of brightness, contrast and saturation, and each image's order of the adjustments (n, 3):
        their ids 0, 1, 2 (torchvision's `fn_idx`)."""
        draw = torch.rand((n, 3), generator=generator, device=generator.device)
        factors = torch.stack([draw[:, i] * (high - low) + low for i, (low, high) in enumerate(self.ranges)], dim=1)
        return factors, torch.rand((n, 3), generator=generator, device=generator.device).argsort(dim=1)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """ColorJitter on `images`, which it overwrites (pass a copy to keep them)."""
        return self.apply(images, *self.sample(images.shape[0], generator))

    @staticmethod
    def apply(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Each step blends every image with what its own adjustment of that step blends with: black (brightness),
        its mean luma (contrast) or its luma (saturation). Overwrites `images` and returns it."""
        for step in order.unbind(1):
            factor = factors.gather(1, step.view(-1, 1)).squeeze(1)
            # 1 - factor as torchvision computes it from a Python float factor: in float64, then to float32
            adjust_colour(images, step, factor, (1.0 - factor.double()).float(), out=images)
        return images
