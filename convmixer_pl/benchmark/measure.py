"""Measuring a phase of the benchmark: per-step times from timestamps taken inside the loops, the CPUs other
processes kept busy meanwhile (a shared machine's noise), and peak memory; and the figures made from them.

(`torch.utils.benchmark.Timer` times a statement it runs itself; these steps run inside Lightning's loop and a plain
loop, so the timestamps come from hooks in them.)
"""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


class PeakMemory:
    """Peak memory of a phase above the memory in use when `start()` was called; see the module docstring."""

    @staticmethod
    def kind_of(device: torch.device) -> str:
        return "CUDA max_memory_allocated" if device.type == "cuda" else "CPU peak RSS (VmHWM)"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0
        self.kind = self.kind_of(device)
        self.available = device.type == "cuda" or self._can_reset_rss()

    @staticmethod
    def _can_reset_rss() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            _proc_status_kib("VmHWM")
            return True
        except OSError:
            return False

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif self.available:
            try:  # hand freed heap back to the OS so the baseline is what is really in use
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except (OSError, AttributeError):
                pass
            self.base = _proc_status_kib("VmRSS") * 1024

    def reset_peak(self) -> None:
        """Forget the peak so far (the warm-up's) and keep measuring from here, against the same baseline."""
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.available:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            sync(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        if not self.available:
            return float("nan")
        return (_proc_status_kib("VmHWM") * 1024 - self.base) / 2**20


def _cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process) so far; None where /proc/stat is
    missing. Time stolen by a hypervisor counts as busy: it is contention too."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    own = os.times()
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), own.user + own.system


class Clock:
    """Timestamps at the start of each step; the step times are the gaps between them after the warm-up."""

    def __init__(self, device: torch.device, warmup: int, on_warm: Callable[[], None]) -> None:
        self.device, self.warmup, self.on_warm = device, warmup, on_warm
        self.stamps: list[float] = []
        self.cpu: list[tuple[float, float] | None] = []

    def tick(self) -> None:
        sync(self.device)
        if len(self.stamps) == self.warmup:
            self.on_warm()
        self.stamps.append(time.perf_counter())
        self.cpu.append(_cpu_seconds())

    def steps(self) -> list[float]:
        gaps = [b - a for a, b in zip(self.stamps, self.stamps[1:])]  # noqa: B905 (lengths differ by one)
        return gaps[self.warmup:]

    def others(self) -> list[float]:
        """CPUs that other processes kept busy during each timed step (NaN where unknown: no /proc/stat, or a
        step too short to tell)."""
        out = []
        for (t0, c0), (t1, c1) in zip(zip(self.stamps, self.cpu), zip(self.stamps[1:], self.cpu[1:])):  # noqa: B905
            if c0 is None or c1 is None or t1 - t0 < 0.05:  # /proc/stat counts 10 ms ticks: too coarse below
                out.append(float("nan"))
            else:
                out.append(max(0.0, (c1[0] - c0[0]) - (c1[1] - c0[1])) / (t1 - t0))
        return out[self.warmup:]


def quiet_steps(steps: list[list[float]], others: list[list[float]], limit: float) -> list[list[float]]:
    """Per round, the steps during which other processes stayed at or below `limit` CPUs."""
    return [[t for t, o in zip(ts, os_, strict=True) if not o > limit] for ts, os_ in zip(steps, others, strict=True)]


def rate_text(batch: int, rounds: list[list[float]], total: int) -> str:
    steps = [t for r in rounds for t in r]
    if not steps:
        return "-" if not total else f"- (0/{total})"
    q = statistics.quantiles(steps, n=4) if len(steps) > 1 else [steps[0]] * 3
    kept = "" if len(steps) == total else f" [{len(steps)}/{total}]"
    return f"{batch / statistics.median(steps):.1f} ({batch / q[2]:.1f}-{batch / q[0]:.1f}){kept}"


def paired_ratio(mine: list[list[float]], theirs: list[list[float]]) -> float | None:
    """Median over rounds of (their median step time / mine), rounds where both kept steps."""
    ratios = [statistics.median(t) / statistics.median(m) for m, t in zip(mine, theirs, strict=False) if m and t]
    return statistics.median(ratios) if ratios else None


def mib_text(values: list[float]) -> str:
    return f"{statistics.median(values):.1f}" if values else "-"
