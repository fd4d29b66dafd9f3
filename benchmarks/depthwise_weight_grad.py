"""Milliseconds per call of a depthwise convolution's weight gradient on the CPU: oneDNN's (what nn.Conv2d runs) in
fp32 and bf16, against convmixer_pl.depthwise's compiled kernel fed fp32 and bf16 as it runs it (chunks of the
batch) and the whole fp32 batch at once, on channels-last activations of one ConvMixer block's shape.

    python -m benchmarks.depthwise_weight_grad --batch 64 --dim 256 --size 16 --kernels [3,5,7,9]
"""

from __future__ import annotations

from functools import partial

import torch
from jsonargparse import CLI

from convmixer_pl.benchmark import cpu_name, time_calls
from convmixer_pl.depthwise import compiled_weight_grad, onednn_backward


def onednn_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return onednn_backward(grad_out, x, weight, [False, True, True])[1]


def depthwise_weight_grad(batch: int = 64, dim: int = 256, size: int = 16, kernels: tuple[int, ...] = (3, 5, 7, 9),
                          min_seconds: float = 0.5) -> None:
    """Milliseconds per call of the depthwise weight gradient: oneDNN's against convmixer_pl.depthwise's.

    Args:
        batch: Images per batch (dim: channels, size: height and width of the activations).
        kernels: Kernel sizes.
        min_seconds: Least time spent timing each (torch.utils.benchmark's blocked_autorange).
    """
    shape = (batch, dim, size, size)
    print(f"activations {shape}, channels_last, {cpu_name()}, torch {torch.__version__}; ms per call: median (p25-p75)")
    names = ("oneDNN fp32", "oneDNN bf16", "compiled fp32", "compiled bf16", "compiled fp32 whole")
    print(f"{'kernel':>6} " + " ".join(f"{name:>20}" for name in names) + f" {'fp32 rel. diff':>14}")

    def compiled(x: torch.Tensor, g: torch.Tensor, padding: int, parts: list[slice] | None = None) -> torch.Tensor:
        return compiled_weight_grad(x, g, padding, parts)[0]

    for k in kernels:
        x, g = (torch.randn(shape).contiguous(memory_format=torch.channels_last) for _ in range(2))
        w = torch.randn(dim, 1, k, k)
        bf16 = [t.to(torch.bfloat16) for t in (x, g, w)]
        cells = []
        for call in (partial(onednn_weight_grad, x, g, w), partial(onednn_weight_grad, *bf16),
                     partial(compiled, x, g, k // 2), partial(compiled, *bf16[:2], k // 2),
                     partial(compiled, x, g, k // 2, [slice(None)])):
            fast, median, slow = (1e3 / rate for rate in time_calls(call, 1, min_seconds).rates())
            cells.append(f"{median:.2f} ({slow:.2f}-{fast:.2f})")
        reference = onednn_weight_grad(x, g, w)
        diff = ((compiled(x, g, k // 2) - reference).abs().max() / reference.abs().max()).item()
        print(f"{k:>6} " + " ".join(f"{cell:>20}" for cell in cells) + f" {diff:>14.1e}")


if __name__ == "__main__":
    CLI(depthwise_weight_grad)
