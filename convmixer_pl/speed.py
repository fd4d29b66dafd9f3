"""Speed choices measured on the machine that runs them: precision, channels_last and the depthwise path on the CPU;
channels_last and torch.compile on GPUs.

What is fastest depends on the machine: bf16 autocast runs at twice fp32's speed on a CPU with native bf16 (AVX512-BF16,
AMX) and at a tenth of it without (emulated); channels_last and torch.compile go opposite ways for kernels 7 and 9 on
GPUs. So the first time a model shape meets a device, `choose_speed` times a few training steps on synthetic data of
each candidate that runs distinct code (`candidates`; bf16 on a CPU only where native): one warm-up step each, then
rounds of one step each in a rotating order, so that a burst of load slows a round's candidates alike. A candidate's
speed is the median over rounds of the reference's step time over its own; clearly slower ones drop out after two
rounds; rounds stop after `budget_s`. `pick` keeps fp32 and the default layout unless another choice is clearly faster,
so that noise does not flip the choice. Where other processes kept the CPUs busy meanwhile (/proc/stat), only a
`BUSY_MARGIN` lead counts and nothing is cached; otherwise the choice is cached (`cache_file`) by device, shape and
torch version. Either way it is said in one line.

A knob set explicitly (precision, channels_last, fast_depthwise_grad, compile) is kept; the rest are measured with it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from itertools import product, starmap
from pathlib import Path

import torch
import torch.nn.functional as F

from .console import say
from .depthwise import COMPILED_KERNEL_SIZES, COMPILED_MIN_NUMEL
from .files import atomic_write
from .model import ConvMixer

CACHE_ENV = "CONVMIXER_CACHE_DIR"
FULL = "32-true"
PRECISION_MARGIN = 0.10  # a reduced precision must be this much faster than fp32 to be chosen
TIE_MARGIN = 0.03  # another layout/path must be this much faster than the default one
BUSY_MARGIN = 1.5  # on a busy machine, how much faster than the default a choice must measure to be taken
DROP_BELOW = 0.6  # after the second round, candidates below this fraction of the best speed are not stepped again
MIN_ROUNDS, MAX_ROUNDS = 3, 7
_AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
_WEIGHTS = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}
_ALIASES = {"32": FULL, "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}
_FULL_PRECISIONS = {FULL, "64-true"}

StepFactory = Callable[["SpeedChoice"], Callable[[], None]]


@dataclass(frozen=True)
class SpeedChoice:
    """How a model trains: precision, memory format, CPU depthwise weight gradient (`ConvMixer`'s), compiled or not."""

    precision: str = FULL
    channels_last: bool = True
    fast_depthwise_grad: bool = True
    compile: bool = False

    def describe(self, device_type: str = "cpu") -> str:
        parts = [self.precision, "channels_last" if self.channels_last else "NCHW"]
        if device_type == "cpu" and not self.compile:
            parts.append("fast depthwise grad" if self.fast_depthwise_grad else "stock depthwise grad")
        return ", ".join(parts + (["compiled"] if self.compile else []))


@dataclass(frozen=True)
class ModelShape:
    """What a step's speed depends on: the architecture, the training input and the per-process batch."""

    dim: int
    depth: int
    kernel_size: int
    patch_size: int
    in_chans: int
    image_size: int
    batch_size: int
    act: str = "gelu"

    @classmethod
    def of(cls, model: ConvMixer, image_size: int, batch_size: int) -> ModelShape:
        """A built ConvMixer's shape, trained on `image_size` inputs (the training crop) in batches of `batch_size`."""
        depthwise = model.blocks[0][0].fn[0]
        return cls(model.num_features, len(model.blocks), depthwise.kernel_size[0], model.patch_size, model.in_chans,
                   image_size, batch_size, model.act)

    def __str__(self) -> str:
        return (f"ConvMixer-{self.dim}/{self.depth} k{self.kernel_size} p{self.patch_size} {self.act}, "
                f"{self.in_chans}x{self.image_size}px, batch {self.batch_size}")

    def activation_numel(self) -> int:
        return self.batch_size * self.dim * (self.image_size // self.patch_size) ** 2


class NotMeasurable(RuntimeError):
    """Measuring now would cost more than it could tell: a step takes too long, or other processes hold the CPUs."""


# -- what the machine can do -------------------------------------------------------------------------------------
def cpu_bf16_facts() -> dict[str, object]:
    """What decides native bf16: the CPU, ATen's and oneDNN's levels (`ATEN_CPU_CAPABILITY`, `ONEDNN_MAX_CPU_ISA`)."""
    caps = getattr(torch.cpu, "get_capabilities", lambda: {})()
    hardware = any(caps.get(name) for name in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"))
    if not caps and hasattr(torch.cpu, "_is_avx512_bf16_supported"):  # torch without get_capabilities()
        hardware = torch.cpu._is_avx512_bf16_supported()
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = False
    return {"machine": platform.machine().lower(), "capability": torch.backends.cpu.get_cpu_capability(),
            "hardware_bf16": bool(hardware), "onednn_bf16": onednn}


def cpu_has_native_bf16(facts: dict[str, object] | None = None) -> bool:
    """Whether bf16 autocast runs on bf16 instructions here rather than emulated (an order of magnitude slower
    than fp32). On x86 that needs AVX512-BF16 or AMX, with both ATen's and oneDNN's kernels allowed to use them."""
    facts = cpu_bf16_facts() if facts is None else facts
    if not facts["onednn_bf16"]:
        return False
    if facts["machine"] in ("x86_64", "amd64", "i386", "i686"):
        # oneDNN also says yes on plain AVX-512 (emulated bf16); ATen's AVX2 kernels convert bf16 in software
        return bool(facts["hardware_bf16"]) and facts["capability"] == "AVX512"
    return True  # on ARM oneDNN's answer is the CPU's bf16 extension itself


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_for_load(threads: int | None = None, window_s: float = 0.5) -> tuple[int, float | None]:
    """Torch's threads for the CPUs other processes leave free now (1 to `threads`, default torch's), and how many
    CPUs they keep busy (None: unknown). Threads wait on each other at every parallel region, so one descheduled
    stalls all: with one busy process on 2 cores, a step ran 4x slower on 2 threads than on 1 (docs/benchmarks.md)."""
    threads = threads or torch.get_num_threads()
    before = load_sample()
    time.sleep(window_s)
    others = other_cpus(before, load_sample())
    if others is None:
        return threads, None
    return max(1, min(threads, round(usable_cpus() - others))), others


def use_free_cpus(saved: int | None = None) -> None:
    """Torch's threads on the CPUs other processes leave free (`threads_for_load`), said where fewer, unless
    OMP_NUM_THREADS sets them; a resumed run's `saved` count is kept where the cores allow: a bit-for-bit resume."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    most = torch.get_num_threads()
    threads, others = (min(saved, most), None) if saved else threads_for_load(most)
    if threads < most and others is not None:
        say(f"speed: {threads} of {most} threads, as other processes keep {others:.1f} of {usable_cpus()} CPUs busy "
            "(OMP_NUM_THREADS sets them)")
    torch.set_num_threads(threads)


def cpu_fallback_workers(num_workers: int, cpus: int | None = None) -> int:
    """Loader workers of a GPU config run on the CPU: at most one fewer than the usable cores. The step's threads
    use every core; one-threaded workers on the others overlap loading with it, more only take turns with it."""
    cpus = usable_cpus() if cpus is None else cpus
    return max(0, min(num_workers, cpus - 1))


def cpu_fallback_precision(precision: str | int | None) -> str | None:
    """The precision of a GPU config run on the CPU: full precision stays as it is; a GPU's reduced precision
    becomes None, to be measured on this CPU (where bf16 is a candidate only with native bf16 and fp16 never)."""
    precision = _ALIASES.get(str(precision), str(precision))  # None: "None", not a full precision
    return precision if precision in _FULL_PRECISIONS else None


def device_key(device: torch.device) -> str:
    """The device as the cache knows it: the CPU's model, ATen's kernel level, native bf16 and threads; or the
    GPU's name and compute capability."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)  # index None: the current device
        return f"cuda {torch.cuda.get_device_name(device)} sm{major}{minor}"
    if device.type != "cpu":
        return device.type
    bf16 = " bf16" if cpu_has_native_bf16() else ""
    return f"cpu {_cpu_name()} {torch.backends.cpu.get_cpu_capability()}{bf16} {torch.get_num_threads()} threads"


def _cpu_name() -> str:
    info: dict[str, str] = {}
    with suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    name = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info and "model" in info:  # "AMD EPYC" alone names several generations
        name += f" (family {info['cpu family']} model {info['model']})"
    return name


# -- the candidates and the choice ---------------------------------------------------------------------------------
def default_choice(device: torch.device, kernel_size: int, precision: str | None = None, **given) -> SpeedChoice:
    """The choice without a measurement: fp32 (or `precision`), channels_last on the CPU and for kernels up to 7
    on GPUs (slower for kernel 9 there: docs/benchmarks.md), the fast depthwise gradient, no compile; each knob
    `given` (not None) as given."""
    choice = SpeedChoice(_ALIASES.get(str(precision), precision) if precision else FULL,
                         device.type == "cpu" or (device.type == "cuda" and kernel_size <= 7))
    return replace(choice, **{k: v for k, v in given.items() if v is not None})


def _precisions(device: torch.device) -> list[str]:
    if device.type == "cpu":
        return [FULL, "bf16-mixed"] if cpu_has_native_bf16() else [FULL]
    if device.type == "cuda":
        return [FULL, "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"]
    return [FULL]


def _runs_as(choice: SpeedChoice, shape: ModelShape, device: torch.device) -> tuple:
    """What actually runs: `fast_depthwise_grad` changes something only on the CPU, outside compiled code, in bf16,
    or in fp32 where `convmixer_pl.depthwise` uses its compiled kernel (channels_last, kernel 5, large)."""
    fast = (device.type == "cpu" and not choice.compile and choice.fast_depthwise_grad
            and (choice.precision in ("bf16-mixed", "bf16-true")
                 or (choice.precision == FULL and choice.channels_last and shape.kernel_size in COMPILED_KERNEL_SIZES
                     and shape.activation_numel() >= COMPILED_MIN_NUMEL)))
    return choice.precision, choice.channels_last, choice.compile, fast


def candidates(shape: ModelShape, device: torch.device, *, precision: str | None = None,
               channels_last: bool | None = None, fast_depthwise_grad: bool | None = None,
               compile: bool | None = None) -> list[SpeedChoice]:
    """The choices worth measuring, once per code path (`_runs_as`), each knob set explicitly kept; the first (fp32,
    NCHW where free) is the reference the others are timed against."""
    cpu = device.type == "cpu"
    knobs = product([_ALIASES.get(str(precision), str(precision))] if precision else _precisions(device),
                    [channels_last] if channels_last is not None else [False, True],
                    [fast_depthwise_grad] if fast_depthwise_grad is not None else ([True, False] if cpu else [True]),
                    [compile] if compile is not None else ([False] if cpu else [False, True]))
    unique: dict[tuple, SpeedChoice] = {}
    for choice in starmap(SpeedChoice, knobs):
        unique.setdefault(_runs_as(choice, shape, device), choice)
    return list(unique.values())


def pick(rates: dict[SpeedChoice, float], default: SpeedChoice) -> SpeedChoice:
    """The fastest choice, with fp32 kept unless a reduced precision is `PRECISION_MARGIN` faster, and within a
    precision the default layout and path kept unless another is `TIE_MARGIN` faster."""
    def best_of(group: dict[SpeedChoice, float]) -> SpeedChoice:
        fastest = max(group, key=group.get)
        preferred = replace(default, precision=fastest.precision)
        return preferred if preferred in group and group[preferred] * (1 + TIE_MARGIN) >= group[fastest] else fastest

    full = best_of({c: r for c, r in rates.items() if c.precision in _FULL_PRECISIONS} or rates)
    reduced = {c: r for c, r in rates.items() if c.precision not in _FULL_PRECISIONS}
    other = best_of(reduced) if reduced else full
    return other if rates[other] > rates[full] * (1 + PRECISION_MARGIN) else full


# -- measuring -----------------------------------------------------------------------------------------------------
@dataclass
class Measurement:
    rates: dict[SpeedChoice, float]  # images/s, each from its speed relative to the reference
    rounds: int
    seconds: float
    other_cpus: float | None = None  # CPUs other processes kept busy during the rounds (None: unknown)

    def contended(self) -> bool:
        """Whether other processes took more than a quarter of the CPUs the steps ran on (its threads)."""
        threads = torch.get_num_threads()
        return self.other_cpus is not None and self.other_cpus - (usable_cpus() - threads) > 0.25 * threads


def measure(choices: list[SpeedChoice], make_step: StepFactory, batch_size: int, *, budget_s: float = 12.0,
            max_s: float = 480.0, clock: Callable[[], float] = time.perf_counter) -> Measurement:
    """Time training steps of `choices` (the first is the reference) in interleaved rounds (module docstring).
    Raises `NotMeasurable` where the reference's warm-up step would put the whole past `max_s`, or was `crowded_out`."""
    start = clock()
    steps, warm_up = _warm_up(choices, make_step, clock, max_s)
    reference, alive = choices[0], list(steps)
    min_rounds = MIN_ROUNDS if warm_up * len(steps) <= 4 * budget_s else 2  # slow steps: fewer rounds, still paired
    speeds: dict[SpeedChoice, list[float]] = {choice: [] for choice in steps}
    reference_times: list[float] = []
    load_before, rounds = load_sample(), 0
    while rounds < MAX_ROUNDS and len(alive) > 1:
        times = {}
        for choice in alive[rounds % len(alive):] + alive[:rounds % len(alive)]:  # a rotating order
            began = clock()
            steps[choice]()
            times[choice] = clock() - began
        rounds += 1
        reference_times.append(times[reference])
        for choice in alive:
            speeds[choice].append(times[reference] / max(times[choice], 1e-9))
        if rounds >= 2:  # one round is one sample: a burst of load in it must not drop the fastest
            alive = _survivors(alive, speeds, reference)
        if rounds >= min_rounds and clock() - start >= budget_s:
            break
    reference_rate = batch_size / statistics.median(reference_times or [warm_up])
    rates = {c: reference_rate * statistics.median(s or [1.0]) for c, s in speeds.items()}  # no rounds: the reference
    return Measurement(rates, rounds, clock() - start, other_cpus(load_before, load_sample()))


def _warm_up(choices: list[SpeedChoice], make_step: StepFactory, clock: Callable[[], float],
             max_s: float) -> tuple[dict[SpeedChoice, Callable[[], None]], float]:
    """Each candidate's step, run once (allocation, oneDNN primitives, compiling), and the reference's time."""
    steps, reference_time = {}, 0.0
    for choice in choices:
        try:
            step = make_step(choice)
            began, load = clock(), load_sample()
            step()
        except Exception as err:  # noqa: BLE001 -- a candidate that cannot run is no candidate; the reference must
            if choice == choices[0]:
                raise
            say(f"speed: {choice.describe()} left out: {(str(err).strip().splitlines() or [type(err).__name__])[0]}")
            continue
        steps[choice] = step
        if choice == choices[0]:
            reference_time, busy = clock() - began, crowded_out(load, load_sample())
            if reference_time * len(choices) * (1 + MIN_ROUNDS) > max_s:
                raise NotMeasurable(f"a step takes {reference_time:.0f} s")
            if busy:
                raise NotMeasurable(busy)
    return steps, reference_time


def load_sample() -> tuple[float, float, float] | None:
    """(seconds, busy CPU seconds of the machine, CPU seconds of this process) now; None without /proc/stat.
    Time a hypervisor stole counts as busy: it is contention too."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    own = os.times()
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return time.monotonic(), busy, own.user + own.system


def other_cpus(before: tuple[float, float, float] | None, after: tuple[float, float, float] | None) -> float | None:
    """CPUs other processes kept busy between two `load_sample`s; None where unknown or too short to tell."""
    if before is None or after is None or after[0] - before[0] < 0.5:  # /proc/stat counts 10 ms ticks
        return None
    return max(0.0, (after[1] - before[1]) - (after[2] - before[2])) / (after[0] - before[0])


def crowded_out(before: tuple[float, float, float] | None, after: tuple[float, float, float] | None) -> str | None:
    """Why a step between two `load_sample`s is no measure of speed, if it is: other processes were busy and it got
    less than a quarter of its threads' CPU time. None where it is a measure, or where that is unknown."""
    others, threads = other_cpus(before, after), torch.get_num_threads()
    if others is None or others <= 0.25 * threads or (after[2] - before[2]) / (after[0] - before[0]) >= threads / 4:
        return None
    return f"other processes keep {others:.1f} of {usable_cpus()} CPUs busy"


def _survivors(alive: list[SpeedChoice], speeds: dict[SpeedChoice, list[float]],
               reference: SpeedChoice) -> list[SpeedChoice]:
    """Those stepped again: the reference, each precision's fastest, and any within `DROP_BELOW` of the best."""
    median = {c: statistics.median(speeds[c]) for c in alive}
    best = max(median.values())
    fastest = {max((c for c in alive if c.precision == p), key=median.get) for p in {c.precision for c in alive}}
    return [c for c in alive if c == reference or c in fastest or median[c] >= DROP_BELOW * best]


def training_step(shape: ModelShape, device: torch.device) -> StepFactory:
    """A factory of training steps on synthetic data, as `ConvMixerClassifier` takes them: forward (channels_last
    input where the model is), label-smoothed cross-entropy, backward, AdamW."""
    images = torch.randn(shape.batch_size, shape.in_chans, shape.image_size, shape.image_size, device=device)
    targets = torch.randint(0, 10, (shape.batch_size,), device=device)

    def make(choice: SpeedChoice) -> Callable[[], None]:
        model = ConvMixer(shape.dim, shape.depth, shape.kernel_size, shape.patch_size, shape.in_chans, 10, shape.act,
                          shape.image_size, fast_depthwise_grad=choice.fast_depthwise_grad)
        layout = torch.channels_last if choice.channels_last else torch.contiguous_format
        model = model.to(device=device, dtype=_WEIGHTS.get(choice.precision), memory_format=layout)
        if choice.compile:
            model.compile()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)  # small: random data stays finite
        autocast = _AUTOCAST.get(choice.precision)
        scaler = torch.amp.GradScaler(device.type, enabled=autocast is torch.float16 and device.type == "cuda")
        inputs = images.to(_WEIGHTS.get(choice.precision, images.dtype))

        def step() -> None:
            with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                loss = F.cross_entropy(model(inputs.contiguous(memory_format=layout)), targets, label_smoothing=0.1)
            scaler.scale(loss).backward()  # disabled (all but fp16 on a GPU): backward() and optimizer.step()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return step
    return make


@contextmanager
def _measuring(device: torch.device) -> Iterator[None]:
    """Leave the run's random streams and cuDNN's algorithm search (on while measuring, as in GPU configs) as is."""
    benchmark = torch.backends.cudnn.benchmark
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        torch.backends.cudnn.benchmark = device.type == "cuda" or benchmark
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = benchmark


# -- the cache -----------------------------------------------------------------------------------------------------
def cache_file() -> Path:
    """`speed.json` in `$CONVMIXER_CACHE_DIR`, else in `$XDG_CACHE_HOME/convmixer`, else in `~/.cache/convmixer`."""
    folder = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "convmixer"
    return Path(folder) / "speed.json"


def cache_key(shape: ModelShape, device: torch.device, fixed: dict[str, object]) -> str:
    given = ", ".join(f"{k} {v}" for k, v in fixed.items())
    return f"{device_key(device)} | {shape} | torch {torch.__version__}" + (f" | set: {given}" if given else "")


def _entries(path: Path) -> dict[str, dict]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        raise ValueError("not a speed cache")
    return data["entries"]


def read_cache(path: Path) -> dict[str, dict]:
    """The cached entries, or none (with one note) if the file cannot be read as this module writes it."""
    try:
        return _entries(path)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        say(f"speed: ignoring the unreadable cache {path} ({' '.join(str(err).split())}); measuring again")
        return {}


def write_cache(path: Path, key: str, entry: dict) -> bool:
    """Add `entry` under `key`, written atomically (a temporary file moved into place); False, with a note, if not."""
    entries = {}  # where missing or unreadable (said when it was read): replaced
    with suppress(OSError, ValueError):
        entries = _entries(path)  # as it is now: another process may have added to it
    entries[key] = entry
    try:
        with atomic_write(path) as f:
            json.dump({"entries": entries}, f, indent=1, sort_keys=True)
        return True
    except (OSError, ValueError) as err:  # OutputError is a ValueError
        say(f"speed: the choice is not remembered: {err}; set {CACHE_ENV} to a folder you can write to")
        return False


def _cached_choice(entry: object, allowed: list[SpeedChoice]) -> SpeedChoice | None:
    try:
        choice = SpeedChoice(**{f.name: entry["choice"][f.name] for f in fields(SpeedChoice)})
    except (TypeError, KeyError):
        return None
    return choice if choice in allowed else None


# -- the one call --------------------------------------------------------------------------------------------------
def choose_speed(shape: ModelShape, device: torch.device | str = "cpu", *, precision: str | None = None,
                 channels_last: bool | None = None, fast_depthwise_grad: bool | None = None,
                 compile: bool | None = None, measure_now: bool = True, budget_s: float = 12.0,
                 make_step: StepFactory | None = None, clock: Callable[[], float] = time.perf_counter) -> SpeedChoice:
    """The speed settings for training `shape` on `device`: each knob given explicitly as it is, the others from
    the cache or, the first time, from a measurement (module docstring), said in one line. `measure_now=False` (a
    multi-process run, whose processes must agree): the cache, else the default. `make_step` and `clock` replace the
    real training step and timer (tests)."""
    device = torch.device(device)
    fixed = {k: v for k, v in (("precision", precision), ("channels_last", channels_last),
                               ("fast_depthwise_grad", fast_depthwise_grad), ("compile", compile)) if v is not None}
    if device.type == "cpu" and _ALIASES.get(str(precision), precision) in ("bf16-mixed", "bf16-true") \
            and not cpu_has_native_bf16():
        say(f"speed: this CPU has no native bf16 ({torch.backends.cpu.get_cpu_capability()}): precision {precision} "
            "is emulated, about 10x slower than 32-true; leave the precision unset to have it measured")
    choices = candidates(shape, device, **fixed)
    if len(choices) == 1:
        return choices[0]
    default = default_choice(device, shape.kernel_size, **fixed)
    path, key = cache_file(), cache_key(shape, device, fixed)
    entry = read_cache(path).get(key)
    cached = _cached_choice(entry, choices) if entry else None
    if cached is not None:
        summary = entry.get("summary", "earlier")
        say(f"speed: {cached.describe(device.type)} chosen by measurement ({summary}); cached in {path}")
        return cached
    if not measure_now:
        say(f"speed: {default.describe(device.type)} (the default: measured only where one process trains)")
        return default
    try:
        with _measuring(device):
            result = measure(choices, make_step or training_step(shape, device), shape.batch_size,
                             budget_s=budget_s, clock=clock)
    except Exception as err:  # noqa: BLE001 -- too slow, or the reference itself failed: train with the default
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        say(f"speed: {default.describe(device.type)} (the default; not measured: {reason})")
        return default
    choice = pick(result.rates, default)
    if result.contended():  # a busy machine's figures: only a wide lead counts, and only for this run
        if default in result.rates and result.rates[choice] < BUSY_MARGIN * result.rates[default]:
            choice = default
        say(f"speed: {choice.describe(device.type)} chosen by measurement on a busy machine "
            f"({_summary(choice, result, device.type)}); not cached: other processes kept {result.other_cpus:.1f} "
            f"of {usable_cpus()} CPUs busy, so it is measured again next time")
        return choice
    summary = _summary(choice, result, device.type)
    said = f"speed: {choice.describe(device.type)} chosen by measurement ({summary})"
    if write_cache(path, key, {"choice": asdict(choice), "summary": summary, "batch_size": shape.batch_size,
                               "images_per_s": {c.describe(device.type): round(r, 1)
                                                for c, r in result.rates.items()},
                               "measured": datetime.now(timezone.utc).isoformat(timespec="seconds")}):
        said += f"; cached in {path}"
    say(said)
    return choice


def _summary(choice: SpeedChoice, result: Measurement, device_type: str) -> str:
    others = sorted((c for c in result.rates if c != choice), key=result.rates.get, reverse=True)
    versus = f" vs {result.rates[others[0]]:.1f} for {others[0].describe(device_type)}" if others else ""
    return (f"{result.rates[choice]:.1f} images/s{versus}; {len(result.rates)} candidates, {result.rounds} rounds, "
            f"{result.seconds:.0f} s")
