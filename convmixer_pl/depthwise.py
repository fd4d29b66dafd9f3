"""The depthwise convolution of the ConvMixer blocks, with a faster weight gradient on the CPU.

On the CPU the depthwise weight gradient dominates a ConvMixer training step: oneDNN's is many times slower than
the forward pass, and slower in bf16 than in fp32. In CPU training this module computes it another way:

- bf16: from fp32 copies of the input and output gradient (the same math, accumulated in fp32: as accurate or more);
- channels_last, kernel 5, at least `COMPILED_MIN_NUMEL` activations: with a kernel that torch.compile generates
  from the 25-tap reduction (`_weight_grad_taps`): one fp32 pass over both tensors, vectorised over channels, over
  chunks of the batch that stay in cache, at the vector width of ATen's CPU capability; compiled once per shape, its
  first result checked against oneDNN's. Kernel 3 keeps oneDNN (fast for it), and so do kernels 7 and 9 (smaller,
  less steady gains, long compiles). If compiling fails (no C++ compiler, say), one warning, and oneDNN is used.

Parameters, state_dict, outputs and input gradients are `nn.Conv2d`'s; so is everything on other devices, in
evaluation, inside a torch.compile'd model, and with `fast_cpu_grad=False` (`ConvMixer(fast_depthwise_grad=False)`).
Measured in docs/benchmarks.md (`python -m benchmarks.depthwise_weight_grad`, `convmixer benchmark --stock_depthwise`).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

COMPILED_KERNEL_SIZES = (5,)  # where the generated weight-gradient kernel measured faster than oneDNN
COMPILED_MIN_NUMEL = 2**20  # smaller activations gain less per step than the compile costs
CHUNK_NUMEL = 2**18  # activations per call of the compiled kernel (1 MiB per fp32 tensor: `_chunks`)
_MAX_COMPILED_SHAPES = 6  # below torch._dynamo's recompile limit, past which it would run the slow eager loop

_compiled_fn = None  # the torch.compile'd `_weight_grad_taps`, built on first use; False once compiling failed
_compiled_keys: set[tuple] = set()
_checked_keys: set[tuple] = set()  # shapes whose compiled result matched oneDNN's


def _weight_grad_taps(x: torch.Tensor, grad_out: torch.Tensor, padding: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias gradient of a stride-1 depthwise convolution in fp32, one reduction per kernel tap. Eager,
    this is slow; compiled, it becomes a single loop over both tensors with k*k accumulators per channel vector."""
    x, grad_out = x.float(), grad_out.float()
    k, (height, width) = 2 * padding + 1, x.shape[-2:]
    padded = F.pad(x, (padding,) * 4)
    taps = [(grad_out * padded[:, :, i:i + height, j:j + width]).sum((0, 2, 3)) for i in range(k) for j in range(k)]
    return torch.stack(taps, 1).view(-1, 1, k, k), grad_out.sum((0, 2, 3))


def onednn_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, output_mask: list[bool]):
    """ATen's (CPU: oneDNN's) stride-1 "same" depthwise backward: (grad_x, grad_w, grad_b), as `output_mask` asks."""
    channels, padding = weight.shape[0], weight.shape[-1] // 2
    return torch.ops.aten.convolution_backward(grad_out, x, weight, [channels], [1, 1], [padding] * 2, [1, 1], False,
                                               [0, 0], channels, output_mask)


def _fits_compiled(x: torch.Tensor, kernel_size: int) -> bool:
    """Whether the compiled kernel is the faster way for this activation (see the module docstring)."""
    return (_compiled_fn is not False and kernel_size in COMPILED_KERNEL_SIZES and x.numel() >= COMPILED_MIN_NUMEL
            and x.is_contiguous(memory_format=torch.channels_last))


def _chunks(x: torch.Tensor) -> list[slice]:
    """Slices of the batch of at most `CHUNK_NUMEL` activations: the compiled kernel's loop runs over all images
    once per vector of channels, from cache for such a chunk and from memory for a whole large batch (3-5x slower
    at batch 64, docs/benchmarks.md)."""
    step = max(1, CHUNK_NUMEL // max(1, x[0].numel()))
    return [slice(start, start + step) for start in range(0, x.shape[0], step)]


def _compiled_parts(x: torch.Tensor, grad_out: torch.Tensor, padding: int) -> list[slice] | None:
    """The chunks to run the compiled kernel on where `_fits_compiled` and their shapes are compiled already or among
    the first few (`_MAX_COMPILED_SHAPES`); None: oneDNN's gradient."""
    if not (_fits_compiled(x, 2 * padding + 1) and grad_out.is_contiguous(memory_format=torch.channels_last)):
        return None
    parts = _chunks(x)
    keys = {(tuple(x[part].shape), x.dtype, grad_out.dtype, padding) for part in parts}
    if len(_compiled_keys | keys) > _MAX_COMPILED_SHAPES:
        return None
    _compiled_keys.update(keys)
    return parts


def _vector_bits() -> int | None:
    """Inductor's vector width, set to ATen's CPU capability. Inductor (torch 2.14) derives it from the capability
    when unset but leaves it out of its cache key, so a kernel generated for one width (AVX2 under
    ATEN_CPU_CAPABILITY=avx2, or another machine's cache) is reused at another: vector stores wider than the loop
    step (heap corruption) or half the channels never written (NaNs). Set, it is in the key."""
    return {"AVX512": 512, "AVX2": 256}.get(torch.backends.cpu.get_cpu_capability())


def _disable_compiled(reason: str) -> None:
    global _compiled_fn
    _compiled_fn = False
    warnings.warn(f"convmixer_pl.depthwise: {reason}; using oneDNN's weight gradient", stacklevel=3)


def compiled_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, padding: int, parts: list[slice] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The compiled kernel's weight and bias gradients (fp32), summed over `parts` of the batch (`_chunks`)."""
    global _compiled_fn
    if _compiled_fn is None:
        bits = _vector_bits()
        _compiled_fn = torch.compile(_weight_grad_taps, dynamic=False, options={"cpp.simdlen": bits} if bits else None)
    grads = [_compiled_fn(x[part], grad_out[part], padding) for part in parts or _chunks(x)]
    return sum(w for w, _ in grads), sum(b for _, b in grads)


def _weight_grad(x: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor, with_bias: bool):
    padding = weight.shape[-1] // 2
    parts = _compiled_parts(x, grad_out, padding)
    if parts is not None:
        try:
            grad_w, grad_b = compiled_weight_grad(x, grad_out, padding, parts)
        except Exception as err:  # a compiler missing or failing: fall back for the rest of the process
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
            _disable_compiled(f"compiling the CPU weight-gradient kernel failed ({first_line})")
        else:  # the bias gradient comes with it: the caller drops it where there is no bias
            key = (tuple(x.shape), x.dtype, grad_out.dtype, padding)
            if key not in _checked_keys:
                # generated code has been wrong before (`_vector_bits`): each new shape's first result is checked
                # against oneDNN's before the kernel is trusted with it
                _, ref_w, ref_b = onednn_backward(grad_out.float(), x.float(), weight.float(), [False, True, True])
                if not (_matches(grad_w, ref_w) and _matches(grad_b, ref_b)):
                    _disable_compiled(f"the compiled CPU weight-gradient kernel disagreed with oneDNN's for shape "
                                      f"{list(x.shape)}")
                    return ref_w, ref_b
                _checked_keys.add(key)
            return grad_w, grad_b
    return onednn_backward(grad_out.float(), x.float(), weight.float(), [False, True, with_bias])[1:]


def _matches(value: torch.Tensor, reference: torch.Tensor) -> bool:
    """Equal up to fp32 summation order: within 1e-3 of the reference's largest magnitude, and finite."""
    scale = reference.abs().max().item()
    return bool(torch.isfinite(value).all()) and (value - reference).abs().max().item() <= 1e-3 * scale + 1e-6


class _CPUDepthwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        w = weight.to(x.dtype)
        ctx.save_for_backward(x, w)
        ctx.dtypes = weight.dtype, None if bias is None else bias.dtype
        return F.conv2d(x, w, None if bias is None else bias.to(x.dtype), padding=w.shape[-1] // 2,
                        groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, w = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn_backward(grad_out, x, w, [True, False, False])[0]
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:  # the latter False where there is no bias
            grad_w, grad_b = _weight_grad(x, grad_out, w, bias_dtype is not None)
            # in the weight's own strides (channels_last or not): autograd's gradient layout contract, which DDP's
            # gradient buckets rely on
            grad_w = torch.empty_like(w, dtype=weight_dtype).copy_(grad_w)
            grad_b = None if bias_dtype is None else grad_b.to(bias_dtype)
        return grad_x, grad_w, grad_b


class DepthwiseConv2d(nn.Conv2d):
    """`nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same")` for an odd kernel: same parameters, same
    state_dict, same outputs; only the CPU weight gradient is computed differently (see the module docstring)."""

    def __init__(self, dim: int, kernel_size: int, fast_cpu_grad: bool = True) -> None:
        super().__init__(dim, dim, kernel_size, groups=dim, padding="same")
        self.fast_cpu_grad = fast_cpu_grad  # False: nn.Conv2d's backward everywhere (the stock path, measured)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.fast_cpu_grad and x.device.type == "cpu" and torch.is_grad_enabled() and self.weight.requires_grad
                and not torch.compiler.is_compiling()):
            if x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                             and torch.get_autocast_dtype("cpu") == torch.bfloat16):
                return _CPUDepthwise.apply(x.to(torch.bfloat16), self.weight, self.bias)
            if x.dtype == torch.float32 and _fits_compiled(x, self.kernel_size[0]):
                return _CPUDepthwise.apply(x, self.weight, self.bias)
        return super().forward(x)
