"""Milliseconds per call of a depthwise convolution's weight gradient on the CPU: oneDNN's (what nn.Conv2d runs) in
fp32 and bf16, against convmixer_pl.depthwise's compiled kernel fed fp32 and bf16 tensors. Channels-last tensors
of one ConvMixer block's activation shape; medians over the timed calls.

    python benchmarks/depthwise_weight_grad.py --batch 64 --dim 256 --size 16 --kernels 3 5 7 9
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from convmixer_pl.depthwise import _weight_grad_taps, onednn_backward


def median_ms(fn, *args, calls: int) -> float:
    fn(*args)  # warm-up; compiles on the first call of a compiled function
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def onednn_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return onednn_backward(grad_out, x, weight, [False, True, True])[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--size", type=int, default=16, help="height and width of the activations")
    p.add_argument("--kernels", type=int, nargs="+", default=[3, 5, 7, 9])
    p.add_argument("--calls", type=int, default=10)
    args = p.parse_args(argv)
    shape = (args.batch, args.dim, args.size, args.size)
    print(f"activations {shape}, channels_last, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'kernel':>6} {'oneDNN fp32':>12} {'oneDNN bf16':>12} {'compiled fp32':>14} {'compiled bf16':>14}"
          f" {'fp32 rel. diff':>14}")
    compiled = torch.compile(_weight_grad_taps, dynamic=False)
    for k in args.kernels:
        x, g = (torch.randn(shape).contiguous(memory_format=torch.channels_last) for _ in range(2))
        w = torch.randn(args.dim, 1, k, k)
        bf16 = [t.to(torch.bfloat16) for t in (x, g, w)]
        row = [median_ms(onednn_weight_grad, x, g, w, calls=args.calls),
               median_ms(onednn_weight_grad, *bf16, calls=args.calls),
               median_ms(compiled, x, g, k // 2, calls=args.calls),
               median_ms(compiled, *bf16[:2], k // 2, calls=args.calls)]
        reference = onednn_weight_grad(x, g, w)
        diff = ((compiled(x, g, k // 2)[0] - reference).abs().max() / reference.abs().max()).item()
        print(f"{k:>6} {row[0]:>12.2f} {row[1]:>12.2f} {row[2]:>14.2f} {row[3]:>14.2f} {diff:>14.1e}")


if __name__ == "__main__":
    main()
