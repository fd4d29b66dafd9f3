"""What the benchmark runs: the same ConvMixer training or inference steps through Lightning (`ConvMixerClassifier`
in a Trainer) and through a plain PyTorch loop (the official CIFAR-10 script's), on a pool of random batches held
on the device; and the CIFAR augmentation, per image and batched."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..model import ConvMixer
from ..module import one_cycle
from .measure import Clock, PeakMemory, sync

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
    fast_depthwise_grad: bool = True  # False: nn.Conv2d's depthwise backward (the official runner, --stock-depthwise)


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


def _autocast(setup: Setup, device: torch.device):
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(setup.precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _plain_model(setup: Setup, device: torch.device) -> ConvMixer:
    torch.manual_seed(0)
    model = ConvMixer(**setup.arch, image_size=setup.image_size, grad_checkpointing=setup.grad_checkpointing,
                      fast_depthwise_grad=setup.fast_depthwise_grad)
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


def _lightning(setup: Setup, device: torch.device, clock: Clock, max_steps: int = -1):
    import lightning as L

    from ..callbacks import ThroughputCallback
    from ..module import ConvMixerClassifier

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
                                 grad_checkpointing=setup.grad_checkpointing,
                                 fast_depthwise_grad=setup.fast_depthwise_grad)
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


def augmentation_rates(device: torch.device, batch_size: int, n: int = 2048) -> tuple[float, float]:
    """images/s of the CIFAR-10 script's training augmentation (`CIFAR_SCRIPT`: crop 0.75-1, flip, RandAugment n1
    m8, ColorJitter 0.1, erasing 0.25): torchvision's per-image pipeline in this process (a DataLoader worker's
    work), and the batched device pipeline (`convmixer_pl.data.device`) on `device`."""
    from ..data import CIFAR_MEAN, CIFAR_SCRIPT, CIFAR_STD
    from ..data.device import BatchAugment

    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    augment = CIFAR_SCRIPT
    per_image = augment.train_transform(32, CIFAR_MEAN, CIFAR_STD)
    start = time.perf_counter()
    for image in images[: n // 4]:
        per_image(image)
    cpu_rate = (n // 4) / (time.perf_counter() - start)
    batched = BatchAugment.from_augmentation(augment, 32, CIFAR_MEAN, CIFAR_STD)
    on_device, generator = images.to(device), torch.Generator(device=device).manual_seed(0)
    batched(on_device[:batch_size], generator)  # warm-up
    sync(device)
    start = time.perf_counter()
    for i in range(0, n, batch_size):
        batched(on_device[i:i + batch_size], generator)
    sync(device)
    return cpu_rate, n / (time.perf_counter() - start)
