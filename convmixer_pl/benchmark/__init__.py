"""`convmixer benchmark`: training and inference speed and peak memory of a ConvMixer.

Runs the same model on the same data three ways in one process and prints images/s and peak memory of each:
`lightning` (ConvMixerClassifier in a Trainer, as `convmixer fit`/`predict` run it), `plain` (a hand-written
PyTorch loop with the same settings: the official CIFAR-10 script's loop) and `official` (that plain loop with
the official script's own settings: NCHW, eager, fp32 on the CPU and fp16 autocast on a GPU). The data is a pool
of random batches already on the device, so the numbers are the training/inference steps, not data loading.

Speeds are medians over the timed steps (per-step wall time, the device synchronised at every step boundary);
p25-p75 shows the noise. With `--rounds N` every run is repeated N times, the runners taking turns, and a ratio
is the median over rounds of the ratio of that round's median step times (paired, so slow spells on a shared
machine hit both sides of a ratio alike).

Memory is the peak during the timed steps above what was in use before the phase started (model and data):
`torch.cuda.max_memory_allocated` on a GPU; on the CPU the process's peak resident set size (VmHWM, reset through
/proc/self/clear_refs after returning freed heap with malloc_trim), which also counts what the allocator keeps and
anything the warm-up left resident (compiled code, Python objects), so it is coarser than the CUDA figure.

    convmixer benchmark --variant convmixer_256_8 --image-size 32 --batch-size 64 \
        --precision bf16-mixed --channels-last on --rounds 3

The measuring is in `measure.py`, the loops that are measured in `runners.py`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import warnings
from dataclasses import asdict, replace

import torch

from ..model import VARIANTS
from ..module import use_channels_last
from .measure import Clock, PeakMemory, mib_text, paired_ratio, quiet_steps, rate_text
from .runners import PRECISIONS, RUNNERS, Result, Setup, augmentation_rates, make_pool, measure


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="convmixer benchmark", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="convmixer_256_8", choices=sorted(VARIANTS), help="named architecture")
    for name in ("dim", "depth", "kernel-size", "patch-size", "num-classes"):
        p.add_argument(f"--{name}", type=int, help=f"override the variant's {name.replace('-', '_')}")
    p.add_argument("--image-size", type=int, help="input size (default 32 for 10-class variants, else 224)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", default="32-true", choices=PRECISIONS)
    p.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"),
                   help="auto: the training default (ConvMixerClassifier's channels_last: null)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--grad-checkpointing", default="off", choices=("off", "on", "both"),
                   help="both: measure training with and without it (inference does not use it)")
    p.add_argument("--cudnn-benchmark", action="store_true")
    p.add_argument("--stock-depthwise", action="store_true",
                   help="every runner uses nn.Conv2d's depthwise backward, not DepthwiseConv2d's CPU weight "
                        "gradient (the official runner always does)")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before them (compilation happens here)")
    p.add_argument("--rounds", type=int, default=1, help="repeat every run, alternating runners, to even out noise")
    p.add_argument("--runners", default=",".join(RUNNERS), help=f"comma-separated subset of {','.join(RUNNERS)}")
    p.add_argument("--phases", default="train,infer", help="comma-separated subset of train,infer")
    p.add_argument("--quiet-cpus", type=float, default=0.25,
                   help="CPU runs: leave out steps during which other processes kept more than this many CPUs "
                        "busy (a shared machine); inf keeps every step")
    p.add_argument("--augmentation", action="store_true",
                   help="also time the CIFAR augmentation: per-image torchvision vs batched on the device")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    for name, values, allowed in (("--runners", args.runners, RUNNERS), ("--phases", args.phases, ("train", "infer"))):
        bad = [v for v in values.split(",") if v not in allowed]
        if bad or not values:
            p.error(f"{name}: {','.join(bad) or 'nothing'} not in {','.join(allowed)}")
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1 or args.batch_size < 1:
        p.error("--steps, --rounds and --batch-size must be positive and --warmup not negative")
    return args


def build_setups(args: argparse.Namespace, device: torch.device) -> tuple[Setup, Setup]:
    """The configured setup and the official script's on this device."""
    arch = dict(VARIANTS[args.variant])
    for key in ("dim", "depth", "kernel_size", "patch_size", "num_classes"):
        if getattr(args, key) is not None:
            arch[key] = getattr(args, key)
    arch.setdefault("num_classes", 1000)
    image_size = args.image_size or (32 if arch["num_classes"] == 10 else 224)
    setting = {"auto": None, "on": True, "off": False}[args.channels_last]
    setup = Setup(arch, image_size, args.batch_size, args.precision,
                  use_channels_last(setting, device, arch["kernel_size"]), args.compile, args.compile_mode,
                  args.grad_checkpointing == "on", args.cudnn_benchmark)
    official = replace(setup, precision="16-mixed" if device.type == "cuda" else "32-true", channels_last=False,
                       compile=False, grad_checkpointing=False, fast_depthwise_grad=False)
    return setup, official


def plan_runs(args: argparse.Namespace, setup: Setup, official: Setup, ckpt_settings: list[bool]
              ) -> tuple[list[Result], list[tuple[Result, str, str, Setup]]]:
    """One Result per (runner, checkpointing), and the (result, runner kind, phase, setup) runs, in the order they
    run; inference never uses checkpointing, so it runs once."""
    plan: list[tuple[Result, str, str, Setup]] = []
    results: list[Result] = []
    for runner in args.runners.split(","):
        for ckpt in ([False] if runner == "official" else ckpt_settings):
            result = Result(runner, ckpt)
            results.append(result)
            base = official if runner == "official" else replace(setup, grad_checkpointing=ckpt,
                                                                 fast_depthwise_grad=not args.stock_depthwise)
            for phase in args.phases.split(","):
                if phase == "infer" and ckpt and len(ckpt_settings) > 1:
                    continue
                plan.append((result, "lightning" if runner == "lightning" else "plain", phase, base))
    return results, plan


def print_header(args: argparse.Namespace, setup: Setup, official: Setup, device: torch.device,
                 other_cpu: list[float], limit: float) -> None:
    a = setup.arch
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"model: {args.variant} dim={a['dim']} depth={a['depth']} kernel={a['kernel_size']} "
          f"patch={a['patch_size']} classes={a['num_classes']}, {setup.image_size}x{setup.image_size}, "
          f"batch {setup.batch_size}")
    on_off = {True: "on", False: "off"}
    print(f"settings: precision {setup.precision}, channels_last {on_off[setup.channels_last]}"
          f"{' (auto)' if args.channels_last == 'auto' else ''}, compile "
          f"{setup.compile_mode if setup.compile else 'off'}, cudnn_benchmark {on_off[setup.cudnn_benchmark]}")
    print(f"device: {name}{threads}; {args.steps} timed steps after {args.warmup} warm-up, {args.rounds} round(s); "
          f"torch {torch.__version__}")
    print(f"official: the plain loop in NCHW, eager, precision {official.precision}, nn.Conv2d's depthwise "
          f"backward (the official script on {device.type})")
    if device.type == "cpu":
        which = "nn.Conv2d's (--stock-depthwise)" if args.stock_depthwise else "convmixer_pl.depthwise's"
        print(f"depthwise weight gradient of lightning and plain: {which}")
    print(f"memory: {PeakMemory.kind_of(device)}, peak during the timed steps above the memory in use before the "
          "phase (MiB)")
    if other_cpu:
        print(f"other processes kept {statistics.median(other_cpu):.2f} of {os.cpu_count()} CPUs busy per step "
              f"(median; max {max(other_cpu):.2f}); they slow steps down and add noise")
        if limit != float("inf"):
            print(f"figures leave out steps during which other processes kept more than {limit:g} CPUs busy; "
                  "[kept/all] marks where that happened")
    print()


def print_table(results: list[Result], kept: dict, batch_size: int) -> None:
    print(f"{'runner':<10} {'grad_ckpt':<9} {'train images/s (p25-p75)':>34} {'inference images/s (p25-p75)':>34} "
          f"{'train peak MiB':>15} {'inference peak MiB':>19}")
    for r in results:
        rates = [rate_text(batch_size, kept[id(r), phase], sum(map(len, getattr(r, f"{phase}_steps"))))
                 for phase in ("train", "infer")]
        print(f"{r.runner:<10} {'on' if r.grad_checkpointing else 'off':<9} {rates[0]:>34} {rates[1]:>34} "
              f"{mib_text(r.train_peak_mib):>15} {mib_text(r.infer_peak_mib):>19}")
    print()


def print_ratios(results: list[Result], kept: dict, ckpt_settings: list[bool]) -> None:
    by_key = {(r.runner, r.grad_checkpointing): r for r in results}
    for ckpt in ckpt_settings:
        for top, bottom in (("lightning", "plain"), ("lightning", "official"), ("plain", "official")):
            ours = by_key.get((top, ckpt))
            ref = by_key.get((bottom, False if bottom == "official" else ckpt))
            if ours is None or ref is None:
                continue
            ratios = []
            for phase, label in (("train", "train"), ("infer", "inference")):
                # paired by round: both ran minutes apart at most, under similar conditions
                ratio = paired_ratio(kept[id(ours), phase], kept[id(ref), phase])
                if ratio is not None:
                    ratios.append(f"{label} {ratio:.2f}x")
            if ratios:
                suffix = " (grad_ckpt on)" if ckpt else ""
                print(f"ratio {top}/{bottom}{suffix}: {', '.join(ratios)}")


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*(log_every_n_steps|does not have many workers|"
                                              r"no `val_dataloader`|LeafSpec).*")
    setup, official = build_setups(args, device)
    ckpt_settings = {"off": [False], "on": [True], "both": [False, True]}[args.grad_checkpointing]
    results, plan = plan_runs(args, setup, official, ckpt_settings)
    pool = make_pool(setup, device)
    for _ in range(args.rounds):
        for result, kind, phase, base in plan:
            steps, others, peak = measure(kind, phase, base, device, pool, args.warmup, args.steps)
            getattr(result, f"{phase}_steps").append(steps)
            getattr(result, f"{phase}_others").append(others)
            getattr(result, f"{phase}_peak_mib").append(peak)
    limit = args.quiet_cpus if device.type == "cpu" else float("inf")
    kept = {(id(r), phase): quiet_steps(getattr(r, f"{phase}_steps"), getattr(r, f"{phase}_others"), limit)
            for r in results for phase in ("train", "infer")}
    other_cpu = [o for r in results for phase in ("train", "infer") for rnd in getattr(r, f"{phase}_others")
                 for o in rnd if o == o]
    print_header(args, setup, official, device, other_cpu, limit)
    print_table(results, kept, setup.batch_size)
    print_ratios(results, kept, ckpt_settings)
    augmentation = None
    if args.augmentation:
        augmentation = augmentation_rates(device, setup.batch_size)
        print(f"augmentation (the CIFAR-10 script's, 32 px), images/s: per-image torchvision "
              f"{augmentation[0]:.0f} (one process), batched on {device.type} {augmentation[1]:.0f} "
              f"(batch {setup.batch_size})")
    if args.json:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "setup": asdict(setup), "official": asdict(official),
                       "device": name, "memory": PeakMemory.kind_of(device), "augmentation_images_per_sec":
                       augmentation, "quiet_cpus": None if limit == float("inf") else limit,
                       "results": [asdict(r) for r in results]}, f, indent=1)
    return results


__all__ = ["Clock", "PeakMemory", "main", "paired_ratio", "quiet_steps"]
