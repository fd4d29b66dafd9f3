"""`convmixer benchmark`: training and inference speed and peak memory of a ConvMixer, three ways in one process.

`lightning` is ConvMixerClassifier in a Trainer (as `convmixer fit`/`predict` run it), `plain` a hand-written loop
with the same settings (the official CIFAR-10 script's loop; both in `runners.py`), `official` that loop with the
official script's settings (NCHW, eager, nn.Conv2d's depthwise backward, fp32 on the CPU, fp16 autocast on a GPU).
The data is a pool of random batches already on the device: the figures are the steps, not data loading. Every
figure comes with its noise (`measure.py`). With `--rounds N` the runners take turns N times and a ratio is the
median of the rounds' ratios, so slow spells of a shared machine hit both sides alike.

    convmixer benchmark --variant convmixer_256_8 --image_size 32 --batch_size 64 --precision bf16-mixed --rounds 3
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Literal

import torch

from ..files import atomic_write
from ..model import VARIANTS
from ..module import use_channels_last
from .measure import Clock, Figure, PeakMemory, cpu_name, paired_ratio, run_metrics, time_calls
from .runners import AUGMENTATIONS, Setup, augmentation_rates, make_pool, measure

RUNNERS, PHASES = ("lightning", "plain", "official"), ("train", "infer")


class BenchmarkError(ValueError):
    """A bad `convmixer benchmark` option; the message names it and the fix."""


def _choices(name: str, value: str, allowed: tuple[str, ...]) -> list[str]:
    chosen = value.split(",")
    if not value or any(v not in allowed for v in chosen):
        raise BenchmarkError(f"--{name} {value!r}: give a comma-separated subset of {','.join(allowed)}")
    return chosen


def benchmark(
    variant: str = "convmixer_256_8", dim: int | None = None, depth: int | None = None,
    kernel_size: int | None = None, patch_size: int | None = None, num_classes: int | None = None,
    act: Literal["gelu", "relu", "silu"] | None = None, image_size: int | None = None, batch_size: int = 64,
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = "32-true", channels_last: bool | None = None,
    compile: bool = False, compile_mode: str = "default", grad_checkpointing: Literal["off", "on", "both"] = "off",
    cudnn_benchmark: bool = False, stock_depthwise: bool = False, device: str = "auto", threads: int | None = None,
    steps: int = 20, warmup: int = 5, rounds: int = 1, runners: str = "lightning,plain,official",
    phases: str = "train,infer", augmentation: Literal["none", "script", "25ep", "crop"] = "none",
    output: str | None = None,
) -> Path | None:
    """Training and inference speed of a ConvMixer: Lightning, a plain loop and the official script's settings.

    Args:
        variant: Named architecture (convmixer_pl.model.VARIANTS); the options below override its values.
        dim: Channels.
        depth: Blocks.
        kernel_size: Depthwise kernel size.
        patch_size: Patch size.
        num_classes: Classes.
        act: Activation.
        image_size: Input size (default 32 for 10-class variants, else 224).
        batch_size: Images per step.
        precision: Lightning's precision; the plain loop uses the same autocast.
        channels_last: Channels-last memory format; null: the training default (model.channels_last null).
        compile: torch.compile the network.
        compile_mode: torch.compile mode.
        grad_checkpointing: Activation checkpointing in training: off, on, or both (measured each way).
        cudnn_benchmark: cuDNN autotuning.
        stock_depthwise: Our runners use nn.Conv2d's depthwise backward, not convmixer_pl.depthwise's CPU weight
            gradient (the official runner always does).
        device: auto (cuda if present), cpu, cuda or cuda:N.
        threads: torch.set_num_threads (default: torch's own choice).
        steps: Timed steps per run.
        warmup: Untimed steps before them (compilation happens here).
        rounds: Repeat every run, the runners taking turns, for paired ratios.
        runners: Comma-separated subset of lightning,plain,official.
        phases: Comma-separated subset of train,infer.
        augmentation: Also time a CIFAR augmentation, per image (torchvision, one process) against batched on the
            device: script (the official script's), 25ep (its 25-epoch recipe's) or crop (crop, flip, erasing).
        output: Also write every figure and step time to this JSON file.
    """
    runner_list, phase_list = _choices("runners", runners, RUNNERS), _choices("phases", phases, PHASES)
    if variant not in VARIANTS:
        raise BenchmarkError(f"--variant {variant!r}: choose one of {', '.join(sorted(VARIANTS))}")
    if min(steps, rounds, batch_size) < 1 or warmup < 0:
        raise BenchmarkError(f"--steps {steps}, --rounds {rounds} and --batch_size {batch_size} must be at least 1 "
                             f"and --warmup {warmup} at least 0")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if threads:
        torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*(log_every_n_steps|does not have many workers|no `val_dataloader`"
                                              r"|LeafSpec)")
    given = dict(dim=dim, depth=depth, kernel_size=kernel_size, patch_size=patch_size, num_classes=num_classes,
                 act=act)
    arch = {"num_classes": 1000, **VARIANTS[variant], **{k: v for k, v in given.items() if v is not None}}
    size = image_size or (32 if arch["num_classes"] == 10 else 224)
    setup = Setup(arch, size, batch_size, precision, use_channels_last(channels_last, dev, arch["kernel_size"]),
                  compile, compile_mode, grad_checkpointing == "on", cudnn_benchmark, not stock_depthwise)
    official = replace(setup, precision="16-mixed" if dev.type == "cuda" else "32-true", channels_last=False,
                       compile=False, grad_checkpointing=False, fast_depthwise_grad=False)
    ckpt_settings = {"off": [False], "on": [True], "both": [False, True]}[grad_checkpointing]
    figures, peaks = _measure_all(runner_list, phase_list, ckpt_settings, setup, official, dev, steps, warmup, rounds)
    _print_header(variant, setup, official, dev, channels_last, steps, warmup, rounds)
    rows = _table(figures, peaks)
    ratios = _ratios(figures, ckpt_settings)
    augment = None if augmentation == "none" else _augmentation(augmentation, dev, batch_size)
    if output is None:
        return None
    with atomic_write(output) as f:
        json.dump({"settings": dict(variant=variant, steps=steps, warmup=warmup, rounds=rounds), "setup": asdict(setup),
                   "official": asdict(official), "device": _device_name(dev), "memory": PeakMemory.kind_of(dev),
                   "rows": rows, "ratios": ratios, "augmentation": augment}, f, indent=1)
    return Path(output)


def _measure_all(runners: list[str], phases: list[str], ckpt_settings: list[bool], setup: Setup, official: Setup,
                 device: torch.device, steps: int, warmup: int, rounds: int) -> tuple[dict, dict]:
    """Figures and peak memory (MiB) of every (runner, checkpointing, phase), one per round, the runners taking
    turns; inference never checkpoints, so it runs once."""
    plan = [(runner, ckpt, phase) for runner in runners for ckpt in ([False] if runner == "official" else ckpt_settings)
            for phase in phases if not (phase == "infer" and ckpt and len(ckpt_settings) > 1)]
    figures: dict[tuple, list[Figure]] = {key: [] for key in plan}
    peaks: dict[tuple, list[float]] = {key: [] for key in plan}
    pool = make_pool(setup, device)
    for _ in range(rounds):
        for runner, ckpt, phase in plan:
            base = official if runner == "official" else replace(setup, grad_checkpointing=ckpt)
            figure, peak = measure("lightning" if runner == "lightning" else "plain", phase, base, device, pool,
                                   warmup, steps)
            figures[runner, ckpt, phase].append(figure)
            peaks[runner, ckpt, phase] += [] if peak is None else [peak]
    return figures, peaks


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def _print_header(variant: str, setup: Setup, official: Setup, device: torch.device, channels_last: bool | None,
                  steps: int, warmup: int, rounds: int) -> None:
    a, on = setup.arch, {True: "on", False: "off"}
    print(f"model: {variant} dim={a['dim']} depth={a['depth']} kernel={a['kernel_size']} patch={a['patch_size']} "
          f"act={a.get('act', 'gelu')} classes={a['num_classes']}, {setup.image_size}x{setup.image_size}, "
          f"batch {setup.batch_size}")
    print(f"settings: precision {setup.precision}, channels_last {on[setup.channels_last]}"
          f"{' (default)' if channels_last is None else ''}, compile {setup.compile_mode if setup.compile else 'off'}"
          f", cudnn_benchmark {on[setup.cudnn_benchmark]}, depthwise weight gradient: "
          f"{'convmixer_pl.depthwise' if setup.fast_depthwise_grad else 'nn.Conv2d'}")
    print(f"official: the plain loop in NCHW, eager, precision {official.precision}, nn.Conv2d's depthwise backward "
          f"(the official script on {device.type})")
    print(f"device: {_device_name(device)}, torch {torch.__version__}; {steps} timed steps after {warmup} "
          f"warm-up per run, {rounds} round(s), every timed step kept")
    print(f"figures: per-step images/s, median and 25th-75th percentiles; others CPUs: how many of the {os.cpu_count()}"
          f" CPUs other processes kept busy meanwhile; peak memory: {PeakMemory.kind_of(device)} above the memory in "
          "use before, MiB\n")


def _table(figures: dict[tuple, list[Figure]], peaks: dict[tuple, list[float]]) -> list[dict]:
    print(f"{'runner':<10} {'grad_ckpt':<9} {'phase':<6} {'images/s':>9} {'p25-p75':>17} {'steps':>5} "
          f"{'others CPUs':>11} {'peak MiB':>9}")
    rows = []
    for (runner, ckpt, phase), rounds in figures.items():
        merged, mib = Figure.merged(rounds), peaks[runner, ckpt, phase]
        peak = statistics.median(mib) if mib else None
        low, median, high = merged.rates()
        print(f"{runner:<10} {'on' if ckpt else 'off':<9} {phase:<6} {median:>9.1f} {f'{low:.1f}-{high:.1f}':>17} "
              f"{len(merged.seconds):>5} {merged.load_text():>11} {'unknown' if peak is None else f'{peak:.1f}':>9}")
        rows.append(dict(runner=runner, grad_checkpointing=ckpt, phase=phase, images_per_sec=median,
                         images_per_sec_p25=low, images_per_sec_p75=high, steps=len(merged.seconds),
                         other_cpus=merged.others, peak_mib=peak, step_seconds=[f.seconds for f in rounds]))
    print()
    return rows


def _ratios(figures: dict[tuple, list[Figure]], ckpt_settings: list[bool]) -> dict[str, float]:
    ratios = {}
    for ckpt in ckpt_settings:
        for top, bottom in (("lightning", "plain"), ("lightning", "official"), ("plain", "official")):
            said = []
            for phase, label in (("train", "train"), ("infer", "inference")):
                mine = figures.get((top, ckpt, phase))
                theirs = figures.get((bottom, ckpt and bottom != "official", phase))
                if mine and theirs:
                    key = f"{top}/{bottom}{' grad_ckpt' if ckpt else ''} {phase}"
                    ratios[key] = paired_ratio(mine, theirs)
                    said.append(f"{label} {ratios[key]:.2f}x")
            if said:
                print(f"ratio {top}/{bottom}{' (grad_ckpt on)' if ckpt else ''}: {', '.join(said)}")
    return ratios


def _augmentation(name: str, device: torch.device, batch_size: int) -> dict[str, dict]:
    per_image, batched = augmentation_rates(AUGMENTATIONS[name], device, batch_size)
    print(f"augmentation {name} (CIFAR, 32 px), images/s: per-image torchvision {per_image.text('blocks')} "
          f"(one process), batched on {device.type} {batched.text('blocks')} (batch {batch_size})")
    return {side: {"images_per_sec": f.rates()[1], "seconds": f.seconds, "other_cpus": f.others}
            for side, f in (("per_image", per_image), ("batched", batched))}


__all__ = ["BenchmarkError", "Clock", "Figure", "PeakMemory", "benchmark", "cpu_name", "paired_ratio", "run_metrics",
           "time_calls"]
