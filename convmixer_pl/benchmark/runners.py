"""What the benchmark runs: the same ConvMixer training or inference steps through Lightning (`ConvMixerClassifier`
in a Trainer) and through a plain PyTorch loop (the official CIFAR-10 script's), on a pool of random batches held
on the device; and the CIFAR augmentation, per image and batched."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data import CIFAR_MEAN, CIFAR_SCRIPT, CIFAR_STD, Augmentation
from ..data.device import BatchAugment
from ..model import ConvMixer
from ..module import one_cycle
from ..preprocessing import DataConfig
from .measure import Clock, Figure, PeakMemory, time_calls

LABEL_SMOOTHING, LR, WEIGHT_DECAY, OPT_EPS = 0.1, 0.01, 0.01, 1e-3  # ConvMixerClassifier's defaults
AUGMENTATIONS = {  # CIFAR training augmentations to time
    "script": CIFAR_SCRIPT,  # the official script's: crop 0.75-1, flip, RandAugment n1 m8, ColorJitter 0.1, erasing
    "25ep": Augmentation(scale=(1.0, 1.0), ratio=(1.0, 1.0), ra_num_ops=2, ra_magnitude=12),  # its 25-epoch recipe
    "crop": Augmentation(scale=(0.75, 1.0), ratio=(1.0, 1.0), re_prob=0.25),  # crop, flip and erasing only
}


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
    fast_depthwise_grad: bool = True  # False: nn.Conv2d's depthwise backward (the official settings, stock_depthwise)


class Batches:
    """`n` batches cycling over a small pool of random batches held on the device."""

    def __init__(self, pool: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> None:
        self.pool, self.n = pool, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return (self.pool[i % len(self.pool)] for i in range(self.n))


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
    model.to(device, memory_format=torch.channels_last if setup.channels_last else torch.preserve_format)
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
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: one_cycle(step + 1, len(batches)))
    scaler = torch.amp.GradScaler(device.type, enabled=setup.precision == "16-mixed")
    train_loss = train_acc = 0.0
    for x, y in batches:
        clock.tick()
        opt.zero_grad(set_to_none=True)
        with _autocast(setup, device):
            output = model(_to_input(x, setup))
            loss = F.cross_entropy(output, y, label_smoothing=LABEL_SMOOTHING)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        train_loss += loss.item() * y.size(0)  # the official loop's per-step host syncs
        train_acc += (output.argmax(1) == y).sum().item()
    clock.tick()


def plain_infer(setup: Setup, device: torch.device, batches: Batches, clock: Clock) -> None:
    model = _plain_model(setup, device).eval()
    with torch.inference_mode(), _autocast(setup, device):
        for x, _ in batches:
            clock.tick()
            model(_to_input(x, setup)).softmax(dim=1)
        clock.tick()


def lightning_run(setup: Setup, device: torch.device, batches: Batches, clock: Clock, train: bool) -> None:
    import lightning as L

    from ..callbacks import ThroughputCallback
    from ..module import ConvMixerClassifier

    class Ticks(L.Callback):
        def on_train_batch_start(self, *args, **kwargs) -> None:
            clock.tick()

        on_predict_batch_start = on_train_end = on_predict_end = on_train_batch_start

    torch.manual_seed(0)
    module = ConvMixerClassifier(**setup.arch, image_size=setup.image_size, label_smoothing=LABEL_SMOOTHING, lr=LR,
                                 weight_decay=WEIGHT_DECAY, opt_eps=OPT_EPS, channels_last=setup.channels_last,
                                 compile=setup.compile, compile_mode=setup.compile_mode,
                                 grad_checkpointing=setup.grad_checkpointing,
                                 fast_depthwise_grad=setup.fast_depthwise_grad)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else device.type,
        devices=[device.index or 0] if device.type == "cuda" else 1, precision=setup.precision,
        max_steps=len(batches), limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        benchmark=setup.cudnn_benchmark, callbacks=[Ticks(), ThroughputCallback()],
    )
    if train:
        trainer.fit(module, train_dataloaders=batches)
    else:
        trainer.predict(module, dataloaders=batches, return_predictions=False)


def measure(loop: str, phase: str, setup: Setup, device: torch.device, pool, warmup: int, steps: int
            ) -> tuple[Figure, float | None]:
    """The timed steps of one run of `loop` (lightning or plain) and its peak memory (MiB)."""
    if setup.compile:
        torch._dynamo.reset()  # every run compiles its own model: no run profits from another's cache
    memory = PeakMemory(device)
    clock = Clock(device, warmup, on_warm=memory.reset_peak)
    memory.start()
    batches = Batches(pool, warmup + steps)
    if loop == "lightning":
        lightning_run(setup, device, batches, clock, train=phase == "train")
    else:
        (plain_train if phase == "train" else plain_infer)(setup, device, batches, clock)
    return clock.figure(setup.batch_size), memory.peak_mib()


def augmentation_rates(augment: Augmentation, device: torch.device, batch_size: int, min_seconds: float = 0.5
                       ) -> tuple[Figure, Figure]:
    """images/s of a CIFAR augmentation (32 px) on random images: torchvision's per-image pipeline in this process,
    collated as a DataLoader does (one loader worker's work), and `BatchAugment` (the device pipeline) on whole
    batches on `device`, reseeded per batch as its loader does."""
    config = DataConfig(32, mean=CIFAR_MEAN, std=CIFAR_STD)
    images = torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    per_image = augment.train_transform(config)
    one_by_one = time_calls(lambda: torch.stack([per_image(image) for image in images]), batch_size, min_seconds)
    batched = BatchAugment.from_augmentation(augment, config)
    on_device, generator, seeds = images.to(device), torch.Generator(device=device), itertools.count()
    return one_by_one, time_calls(lambda: batched(on_device, generator.manual_seed(next(seeds))), batch_size,
                                  min_seconds)
