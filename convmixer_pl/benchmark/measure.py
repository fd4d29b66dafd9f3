"""How speed is measured: per-step wall times stamped inside the loops (the device synchronised at every stamp) or
per-call times (`torch.utils.benchmark`), peak memory, and the metrics a run logged.

A figure is the median over every timed step, the 25th-75th percentiles beside it, the number of steps, and the
CPUs that other processes kept busy over the same window (`speed.load_sample`, from /proc/stat; unknown below half
a second). No step is left out for being slow: on a busy machine the spread and the load say how far to trust it.
"""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import time
from collections.abc import Callable, Collection
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils import benchmark as torch_benchmark

from ..plots import read_metrics
from ..speed import device_key, load_sample, other_cpus


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    """The CPU as figures name it: model, the instruction set torch uses, native bf16, threads (`speed.device_key`)."""
    return device_key(torch.device("cpu"))[len("cpu "):]


@dataclass
class Figure:
    """One measurement: seconds per step (or call), the items (images) each handles, other processes' CPU load."""

    seconds: list[float]
    items: int
    others: float | None = None

    def rates(self) -> tuple[float, float, float]:
        """Per-step items/s: the 25th percentile, the median and the 75th percentile."""
        r = [self.items / s for s in self.seconds]
        return tuple(statistics.quantiles(r, n=4, method="inclusive")) if len(r) > 1 else (r[0],) * 3

    def load_text(self) -> str:
        return "unknown" if self.others is None else f"{self.others:.2f}"

    def text(self, unit: str = "steps") -> str:
        low, median, high = self.rates()
        return (f"{median:.1f} (p25-p75 {low:.1f}-{high:.1f}, {len(self.seconds)} {unit}, others' CPUs "
                f"{self.load_text()})")

    @staticmethod
    def merged(figures: list[Figure]) -> Figure:
        """Every round's steps together; the load averaged over the rounds that know it."""
        loads = [f.others for f in figures if f.others is not None]
        return Figure([s for f in figures for s in f.seconds], figures[0].items,
                      statistics.fmean(loads) if loads else None)


def time_calls(fn: Callable[[], object], items: int, min_seconds: float = 0.5) -> Figure:
    """`fn()` timed by `torch.utils.benchmark` (blocks of calls, CUDA synchronised) after one warm-up call, on all of
    torch's threads (its Timer defaults to one)."""
    fn()
    start = load_sample()
    timer = torch_benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=min_seconds)
    return Figure(list(measurement.times), items, other_cpus(start, load_sample()))


class Clock:
    """Stamps at the start of each step (and one after the last); the steps after `warmup` are timed."""

    def __init__(self, device: torch.device, warmup: int, on_warm: Callable[[], None]) -> None:
        self.device, self.warmup, self.on_warm = device, warmup, on_warm
        self.stamps: list[tuple[float, tuple | None]] = []  # (perf_counter, speed.load_sample)

    def tick(self) -> None:
        sync(self.device)
        if len(self.stamps) == self.warmup:
            self.on_warm()
        self.stamps.append((time.perf_counter(), load_sample()))

    def figure(self, items: int) -> Figure:
        timed = self.stamps[self.warmup:]
        seconds = [b[0] - a[0] for a, b in zip(timed, timed[1:])]  # noqa: B905 (lengths differ by one)
        return Figure(seconds, items, other_cpus(timed[0][1], timed[-1][1]))


def paired_ratio(mine: list[Figure], theirs: list[Figure]) -> float:
    """How many times faster `mine` ran: the median over rounds of (their median step time / mine), so that a slow
    spell of a shared machine, which hits both runs of a round alike, cancels out."""
    return statistics.median(statistics.median(t.seconds) / statistics.median(m.seconds)
                             for m, t in zip(mine, theirs, strict=True))


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


class PeakMemory:
    """Peak memory above what was in use at `start()`: `torch.cuda.max_memory_allocated` on a GPU; on the CPU the
    process's peak resident set (VmHWM, reset through /proc/self/clear_refs after malloc_trim hands freed heap
    back), which also counts what the allocator keeps, so it is coarser than the CUDA figure."""

    @staticmethod
    def kind_of(device: torch.device) -> str:
        return "CUDA max_memory_allocated" if device.type == "cuda" else "CPU peak RSS (VmHWM)"

    def __init__(self, device: torch.device) -> None:
        self.device, self.base = device, 0
        self.available = device.type == "cuda" or self._reset_rss_peak()

    @staticmethod
    def _reset_rss_peak() -> bool:
        with suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            return True
        return False

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            self.reset_peak()
            self.base = torch.cuda.memory_allocated(self.device)
        elif self.available:
            with suppress(OSError, AttributeError):  # hand freed heap back to the OS: the baseline is what is in use
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            self.reset_peak()  # else VmHWM still holds the RSS from before that memory was handed back
            self.base = _proc_status_kib("VmRSS") * 1024

    def reset_peak(self) -> None:
        """Forget the peak so far (the warm-up's), against the same baseline."""
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.available:
            self._reset_rss_peak()

    def peak_mib(self) -> float | None:
        if self.device.type == "cuda":
            sync(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        return (_proc_status_kib("VmHWM") * 1024 - self.base) / 2**20 if self.available else None


def run_metrics(run_dir: str | os.PathLike, skip: Collection[Path] = ()) -> dict[str, dict[int, float]]:
    """What a `convmixer fit`/`test` run logged by epoch, from the newest `lightning_logs/version_N/metrics.csv`
    under `run_dir`, not in the `skip` folders (`plots.read_metrics`): {metric: {epoch: value}}; {} before any log."""
    logs = [p for p in Path(run_dir).glob("lightning_logs/version_*/metrics.csv") if p.parent not in skip]
    newest = max(logs, key=lambda p: int(p.parent.name[8:]) if p.parent.name[8:].isdigit() else -1, default=None)
    return {key: dict(values) for key, values in read_metrics(newest).items()} if newest else {}
