"""`python -m convmixer_pl.benchmark`: training and inference speed and peak memory of a ConvMixer.

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

    python -m convmixer_pl.benchmark --variant convmixer_256_8 --image-size 32 --batch-size 64 \\
        --precision bf16-mixed --channels-last on --rounds 3
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F

from . import depthwise
from .model import VARIANTS, ConvMixer
from .module import one_cycle, use_channels_last

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
RUNNERS = ("lightning", "plain", "official")
LABEL_SMOOTHING, LR, WEIGHT_DECAY, OPT_EPS = 0.1, 0.01, 0.01, 1e-3  # ConvMixerClassifier's defaults


@dataclass(frozen=True)
class Setup:
    """One configuration to measure."""

    arch: dict
    image_size: int
    batch_size: int
    precision: str
    channels_last: bool
    compile: bool
    compile_mode: str
    grad_checkpointing: bool
    cudnn_benchmark: bool


@dataclass
class Result:
    runner: str
    grad_checkpointing: bool
    # per round: the step times (s), and the CPUs other processes kept busy during each step
    train_steps: list[list[float]] = field(default_factory=list)
    infer_steps: list[list[float]] = field(default_factory=list)
    train_others: list[list[float]] = field(default_factory=list)
    infer_others: list[list[float]] = field(default_factory=list)
    train_peak_mib: list[float] = field(default_factory=list)
    infer_peak_mib: list[float] = field(default_factory=list)


# --- measuring ---------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
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
            _sync(self.device)
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
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.available:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            _sync(self.device)
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
        _sync(self.device)
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


class Batches:
    """`n` batches cycling over a small pool of random batches held on the device."""

    def __init__(self, pool: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> None:
        self.pool, self.n = pool, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(self.n):
            yield self.pool[i % len(self.pool)]


def make_pool(setup: Setup, device: torch.device, size: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    shape = (setup.batch_size, setup.arch.get("in_chans", 3), setup.image_size, setup.image_size)
    return [(torch.randn(shape, generator=g).to(device),
             torch.randint(0, setup.arch["num_classes"], (setup.batch_size,), generator=g).to(device))
            for _ in range(size)]


# --- the plain PyTorch loop (the official script's) ----------------------------------------------------------

def _autocast(setup: Setup, device: torch.device):
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(setup.precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _plain_model(setup: Setup, device: torch.device) -> ConvMixer:
    torch.manual_seed(0)
    model = ConvMixer(**setup.arch, image_size=setup.image_size, grad_checkpointing=setup.grad_checkpointing)
    model.to(device)
    if setup.channels_last:
        model.to(memory_format=torch.channels_last)
    if setup.compile:
        model.compile(mode=setup.compile_mode)
    return model


def _to_input(x: torch.Tensor, setup: Setup) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if setup.channels_last else x


def plain_train(setup: Setup, device: torch.device, batches: Batches, clock: Clock) -> None:
    model = _plain_model(setup, device).train()
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                             {"params": no_decay, "weight_decay": 0.0}], lr=LR, eps=OPT_EPS)
    total = len(batches)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: one_cycle(step + 1, total))
    scaler = torch.amp.GradScaler(device.type, enabled=setup.precision == "16-mixed")
    train_loss = train_acc = 0.0
    for x, y in batches:
        clock.tick()
        x = _to_input(x, setup)
        opt.zero_grad(set_to_none=True)
        with _autocast(setup, device):
            output = model(x)
            loss = F.cross_entropy(output, y, label_smoothing=LABEL_SMOOTHING)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        train_loss += loss.item() * y.size(0)
        train_acc += (output.argmax(1) == y).sum().item()
    clock.tick()


def plain_infer(setup: Setup, device: torch.device, batches: Batches, clock: Clock) -> None:
    model = _plain_model(setup, device).eval()
    with torch.inference_mode(), _autocast(setup, device):
        for x, _ in batches:
            clock.tick()
            model(_to_input(x, setup)).softmax(dim=1)
        clock.tick()


# --- the same through Lightning --------------------------------------------------------------------------------

def _lightning(setup: Setup, device: torch.device, clock: Clock, max_steps: int = -1):
    import lightning as L

    from .module import ConvMixerClassifier
    from .throughput import ThroughputCallback

    class Ticks(L.Callback):
        def on_train_batch_start(self, *args, **kwargs) -> None:
            clock.tick()

        def on_train_end(self, *args, **kwargs) -> None:
            clock.tick()

        def on_predict_batch_start(self, *args, **kwargs) -> None:
            clock.tick()

        def on_predict_end(self, *args, **kwargs) -> None:
            clock.tick()

    torch.manual_seed(0)
    arch = dict(setup.arch)
    module = ConvMixerClassifier(**arch, image_size=setup.image_size, label_smoothing=LABEL_SMOOTHING, lr=LR,
                                 weight_decay=WEIGHT_DECAY, opt_eps=OPT_EPS, channels_last=setup.channels_last,
                                 compile=setup.compile, compile_mode=setup.compile_mode,
                                 grad_checkpointing=setup.grad_checkpointing)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else device.type,
        devices=[device.index or 0] if device.type == "cuda" else 1, precision=setup.precision,
        max_steps=max_steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        benchmark=setup.cudnn_benchmark, callbacks=[Ticks(), ThroughputCallback()],
    )
    return trainer, module


def lightning_train(setup: Setup, device: torch.device, batches: Batches, clock: Clock) -> None:
    trainer, module = _lightning(setup, device, clock, max_steps=len(batches))
    trainer.fit(module, train_dataloaders=batches)


def lightning_infer(setup: Setup, device: torch.device, batches: Batches, clock: Clock) -> None:
    trainer, module = _lightning(setup, device, clock)
    trainer.predict(module, dataloaders=batches, return_predictions=False)


def measure(runner: str, phase: str, setup: Setup, device: torch.device, pool, warmup: int, steps: int
            ) -> tuple[list[float], list[float], float]:
    """Step times (s), the other processes' CPU use during each (CPUs), and peak memory (MiB) of one run."""
    if setup.compile:
        torch._dynamo.reset()  # every run compiles its own model: no run profits from another's cache
    fn = {("lightning", "train"): lightning_train, ("lightning", "infer"): lightning_infer,
          ("plain", "train"): plain_train, ("plain", "infer"): plain_infer}[(runner, phase)]
    memory = PeakMemory(device)
    clock = Clock(device, warmup, on_warm=memory.reset_peak)
    memory.start()
    fn(setup, device, Batches(pool, warmup + steps), clock)
    return clock.steps(), clock.others(), memory.peak_mib()


# --- the data pipelines ---------------------------------------------------------------------------------------------

def augmentation_rates(device: torch.device, batch_size: int, n: int = 2048) -> tuple[float, float]:
    """images/s of the CIFAR training augmentation (crop scale 0.75-1, flip, erasing 0.25; no RandAugment or
    jitter): torchvision's per-image pipeline in this process (a DataLoader worker's work), and the batched
    device pipeline (`convmixer_pl.gpu_data`) on `device`."""
    from .data import CIFAR_MEAN, CIFAR_STD
    from .gpu_data import BatchAugment
    from .transforms import train_transform

    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    per_image = train_transform(32, CIFAR_MEAN, CIFAR_STD, (0.75, 1.0), (1.0, 1.0), 0.5, re_prob=0.25)
    start = time.perf_counter()
    for image in images[: n // 4]:
        per_image(image)
    cpu_rate = (n // 4) / (time.perf_counter() - start)
    batched = BatchAugment(32, CIFAR_MEAN, CIFAR_STD, (0.75, 1.0), (1.0, 1.0), 0.5, erase_prob=0.25)
    on_device, generator = images.to(device), torch.Generator(device=device).manual_seed(0)
    batched(on_device[:batch_size], generator)  # warm-up
    _sync(device)
    start = time.perf_counter()
    for i in range(0, n, batch_size):
        batched(on_device[i:i + batch_size], generator)
    _sync(device)
    return cpu_rate, n / (time.perf_counter() - start)


# --- command line ------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m convmixer_pl.benchmark", description=__doc__.split("\n\n")[0],
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
                       compile=False, grad_checkpointing=False)
    return setup, official


def _kept(steps: list[list[float]], others: list[list[float]], limit: float) -> list[list[float]]:
    """Per round, the steps during which other processes stayed at or below `limit` CPUs."""
    return [[t for t, o in zip(ts, os_, strict=True) if not o > limit] for ts, os_ in zip(steps, others, strict=True)]


def _rate_text(batch: int, rounds: list[list[float]], total: int) -> str:
    steps = [t for r in rounds for t in r]
    if not steps:
        return "-" if not total else f"- (0/{total})"
    q = statistics.quantiles(steps, n=4) if len(steps) > 1 else [steps[0]] * 3
    kept = "" if len(steps) == total else f" [{len(steps)}/{total}]"
    return f"{batch / statistics.median(steps):.1f} ({batch / q[2]:.1f}-{batch / q[0]:.1f}){kept}"


def _paired_ratio(mine: list[list[float]], theirs: list[list[float]]) -> float | None:
    """Median over rounds of (their median step time / mine), rounds where both kept steps."""
    ratios = [statistics.median(t) / statistics.median(m) for m, t in zip(mine, theirs, strict=False) if m and t]
    return statistics.median(ratios) if ratios else None


def _mib_text(values: list[float]) -> str:
    return f"{statistics.median(values):.1f}" if values else "-"


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
    runners = args.runners.split(",")
    phases = args.phases.split(",")
    ckpt_settings = {"off": [False], "on": [True], "both": [False, True]}[args.grad_checkpointing]
    pool = make_pool(setup, device)

    # (runner, setup) pairs in the order they run; inference never uses checkpointing, so it runs once
    plan: list[tuple[Result, str, str, Setup, bool]] = []
    results: list[Result] = []
    for runner in runners:
        for ckpt in ([False] if runner == "official" else ckpt_settings):
            result = Result(runner, ckpt)
            results.append(result)
            base = official if runner == "official" else replace(setup, grad_checkpointing=ckpt)
            for phase in phases:
                if phase == "infer" and ckpt and len(ckpt_settings) > 1:
                    continue
                stock = args.stock_depthwise or runner == "official"
                plan.append((result, "lightning" if runner == "lightning" else "plain", phase, base, stock))

    for _ in range(args.rounds):
        for result, kind, phase, base, stock in plan:
            depthwise.ENABLED = not stock
            try:
                steps, others, peak = measure(kind, phase, base, device, pool, args.warmup, args.steps)
            finally:
                depthwise.ENABLED = True
            getattr(result, f"{phase}_steps").append(steps)
            getattr(result, f"{phase}_others").append(others)
            getattr(result, f"{phase}_peak_mib").append(peak)
    limit = args.quiet_cpus if device.type == "cpu" else float("inf")
    kept = {(id(r), phase): _kept(getattr(r, f"{phase}_steps"), getattr(r, f"{phase}_others"), limit)
            for r in results for phase in ("train", "infer")}
    other_cpu = [o for r in results for phase in ("train", "infer") for rnd in getattr(r, f"{phase}_others")
                 for o in rnd if o == o]

    memory_kind = PeakMemory.kind_of(device)
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
    print(f"memory: {memory_kind}, peak during the timed steps above the memory in use before the phase (MiB)")
    if other_cpu:
        print(f"other processes kept {statistics.median(other_cpu):.2f} of {os.cpu_count()} CPUs busy per step "
              f"(median; max {max(other_cpu):.2f}); they slow steps down and add noise")
        if limit != float("inf"):
            print(f"figures leave out steps during which other processes kept more than {limit:g} CPUs busy; "
                  "[kept/all] marks where that happened")
    print()
    header = f"{'runner':<10} {'grad_ckpt':<9} {'train images/s (p25-p75)':>34} {'inference images/s (p25-p75)':>34} " \
             f"{'train peak MiB':>15} {'inference peak MiB':>19}"
    print(header)
    for r in results:
        rates = [_rate_text(setup.batch_size, kept[id(r), phase], sum(map(len, getattr(r, f"{phase}_steps"))))
                 for phase in ("train", "infer")]
        print(f"{r.runner:<10} {'on' if r.grad_checkpointing else 'off':<9} {rates[0]:>34} {rates[1]:>34} "
              f"{_mib_text(r.train_peak_mib):>15} {_mib_text(r.infer_peak_mib):>19}")
    print()
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
                ratio = _paired_ratio(kept[id(ours), phase], kept[id(ref), phase])
                if ratio is not None:
                    ratios.append(f"{label} {ratio:.2f}x")
            if ratios:
                suffix = " (grad_ckpt on)" if ckpt else ""
                print(f"ratio {top}/{bottom}{suffix}: {', '.join(ratios)}")
    augmentation = None
    if args.augmentation:
        augmentation = augmentation_rates(device, setup.batch_size)
        print(f"augmentation (CIFAR 32 px: crop 0.75-1, flip, erasing 0.25), images/s: per-image torchvision "
              f"{augmentation[0]:.0f} (one process), batched on {device.type} {augmentation[1]:.0f} "
              f"(batch {setup.batch_size})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "setup": asdict(setup), "official": asdict(official),
                       "device": name, "memory": memory_kind, "augmentation_images_per_sec": augmentation,
                       "quiet_cpus": None if limit == float("inf") else limit,
                       "results": [asdict(r) for r in results]}, f, indent=1)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
