"""ConvMixer (Trockman & Kolter, "Patches Are All You Need?") as a plain PyTorch module.

Layer for layer the official implementation; parameter names follow timm's layout (`stem.*`, `blocks.{i}.*`,
`head.*`), so timm state dicts load as they are and the official flat `nn.Sequential` keys map onto it one to one.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .depthwise import DepthwiseConv2d

Activation = Literal["gelu", "relu", "silu"]
ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


class Residual(nn.Module):
    """`fn(x) + x`; named `fn` so the official `*.0.fn.*` keys keep their shape."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


@contextmanager
def _keep_norm_stats(module: nn.Module):
    """Restore the BatchNorm buffers of `module` on exit (used around a checkpointed block's recomputation)."""
    buffers = [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved, strict=True):
                buffer.copy_(value)


class ConvMixer(nn.Module):
    """Patch embedding, `depth` depthwise/pointwise mixing blocks, global average pool, linear head.

    Args:
        dim: Channels of every layer (the "h" of ConvMixer-h/d).
        depth: Number of mixing blocks (the "d").
        kernel_size: Depthwise kernel size (odd).
        patch_size: Patch-embedding stride and kernel size.
        in_chans: Input channels; the CLI links it from the data module.
        num_classes: Classes; the CLI links it from the data module.
        act: Activation: gelu (the paper's), relu (the 768/32 release's) or silu (cheaper than gelu on a CPU).
        image_size: Input size, checked against patch_size; the CLI links it from the data module.
        grad_checkpointing: Recompute each block's activations in the backward pass instead of storing them:
            less memory for big variants, same gradients, about one more forward pass of time.
        fast_depthwise_grad: On the CPU, compute the depthwise weight gradient with `convmixer_pl.depthwise`'s
            faster kernels (no effect on other devices; off: nn.Conv2d's own).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        kernel_size: int = 9,
        patch_size: int = 7,
        in_chans: int = 3,
        num_classes: int = 1000,
        act: Activation = "gelu",
        image_size: int | None = None,
        grad_checkpointing: bool = False,
        fast_depthwise_grad: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("depth", depth), ("kernel_size", kernel_size),
                            ("patch_size", patch_size), ("in_chans", in_chans), ("num_classes", num_classes)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ConvMixer: {name} must be a positive integer, got {value!r}")
        if kernel_size % 2 == 0:
            # padding="same" with an even kernel pads asymmetrically (an extra copy per layer): not the paper's model
            raise ValueError(f"ConvMixer: kernel_size must be odd, got {kernel_size} (the paper uses 5, 7 or 9)")
        if act not in ACTIVATIONS:
            raise ValueError(f"ConvMixer: act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
        if image_size is not None and patch_size > image_size:
            raise ValueError(f"ConvMixer: patch_size {patch_size} is larger than the {image_size}px image; "
                             f"use patch_size <= {image_size}")
        self.num_classes, self.in_chans, self.act, self.num_features = num_classes, in_chans, act, dim
        self.patch_size, self.grad_checkpointing = patch_size, grad_checkpointing
        act_layer = ACTIVATIONS[act]

        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size),
            act_layer(),
            nn.BatchNorm2d(dim),
        )
        self.blocks = nn.Sequential(*[
            nn.Sequential(
                Residual(nn.Sequential(
                    DepthwiseConv2d(dim, kernel_size, fast_depthwise_grad),  # nn.Conv2d(groups=dim, padding="same")
                    act_layer(),
                    nn.BatchNorm2d(dim),
                )),
                nn.Conv2d(dim, dim, kernel_size=1),
                act_layer(),
                nn.BatchNorm2d(dim),
            )
            for _ in range(depth)
        ])
        self.pooling = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.head = nn.Linear(dim, num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] < self.patch_size or x.shape[-2] < self.patch_size:
            raise ValueError(f"ConvMixer: input {tuple(x.shape[-2:])} is smaller than patch_size {self.patch_size}")
        x = self.stem(x)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            # recompute each block in the backward pass instead of storing its activations; the recomputation
            # must not update the BatchNorm running statistics a second time
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False,
                               context_fn=lambda block=block: (nullcontext(), _keep_norm_stats(block)))
            return x
        return self.blocks(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pooling(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# Named variants: the paper's released ImageNet models and the CIFAR-10 script's model.
VARIANTS: dict[str, dict] = {
    "convmixer_1536_20": dict(dim=1536, depth=20, kernel_size=9, patch_size=7),
    "convmixer_768_32": dict(dim=768, depth=32, kernel_size=7, patch_size=7, act="relu"),
    "convmixer_1024_20_ks9_p14": dict(dim=1024, depth=20, kernel_size=9, patch_size=14),
    "convmixer_256_8": dict(dim=256, depth=8, kernel_size=5, patch_size=2, num_classes=10),
}


def create_model(name: str, **overrides) -> ConvMixer:
    """Build a named variant; keyword arguments override its settings (e.g. `num_classes=100`)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown ConvMixer variant {name!r}; choose one of {sorted(VARIANTS)}")
    return ConvMixer(**{**VARIANTS[name], **overrides})
