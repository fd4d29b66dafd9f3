"""The depthwise convolution of the ConvMixer blocks, with a faster weight gradient for bf16 on the CPU.

On the CPU, oneDNN's bf16 weight gradient of a depthwise convolution is several times slower than its fp32 one
(ConvMixer-256/8, batch 64, 32 px: ~45 ms against ~20 ms per block on this project's 2-core machine, while the
forward pass takes ~1 ms), and it dominates a bf16 training step. Under bf16 on the CPU this module computes that
gradient from fp32 copies of the input and output gradient instead: the same math, accumulated in fp32 (so at
least as accurate), about twice as fast. Everything else, and every other device and dtype, is `nn.Conv2d`'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ENABLED = True  # set False to measure the stock path (docs/benchmarks.md)


class _BF16CPUDepthwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int):
        w = weight.to(x.dtype)
        ctx.save_for_backward(x, w)
        ctx.padding, ctx.dtypes = padding, (weight.dtype, None if bias is None else bias.dtype)
        return F.conv2d(x, w, None if bias is None else bias.to(x.dtype), padding=padding, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, w = ctx.saved_tensors
        channels, pad = x.shape[1], [ctx.padding] * 2
        weight_dtype, bias_dtype = ctx.dtypes
        args = ([1, 1], pad, [1, 1], False, [0, 0], channels)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(grad_out, x, w, None, *args, [True, False, False])[0]
        if ctx.needs_input_grad[1] or (bias_dtype is not None and ctx.needs_input_grad[2]):
            _, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad_out.float(), x.float(), w.float(), [channels], *args, [False, True, bias_dtype is not None])
            grad_w = grad_w.to(weight_dtype)
            grad_b = None if grad_b is None else grad_b.to(bias_dtype)
        return grad_x, grad_w, grad_b, None


class DepthwiseConv2d(nn.Conv2d):
    """`nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same")` for an odd kernel: same parameters, same
    state_dict, same outputs; only the bf16 CPU backward pass differs (see the module docstring)."""

    def __init__(self, dim: int, kernel_size: int) -> None:
        super().__init__(dim, dim, kernel_size, groups=dim, padding="same")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if ENABLED and x.device.type == "cpu" and torch.is_grad_enabled() and self.weight.requires_grad and (
                x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                              and torch.get_autocast_dtype("cpu") == torch.bfloat16)):
            return _BF16CPUDepthwise.apply(x.to(torch.bfloat16), self.weight, self.bias, self.kernel_size[0] // 2)
        return super().forward(x)
