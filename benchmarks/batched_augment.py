"""images/s of the CIFAR-10 training augmentation: torchvision's per-image pipeline in this process (what one loader
worker does, collation included) against `BatchAugment` (`data.gpu_pipeline`) on whole batches, on the CPU and on
CUDA when there is one. Recipes: `script`, the official script's (RandomResizedCrop 0.75-1, flip, RandAugment n1 m8,
ColorJitter 0.1, RandomErasing 0.25); `25ep`, its README's 25-epoch one (no crop, flip, RandAugment n2 m12);
`crop`, crop, flip and erasing only. Run it on an idle machine; `--tiny` only checks that it runs.

    python benchmarks/batched_augment.py --recipes script 25ep --batch 128 512
    OMP_NUM_THREADS=2 python benchmarks/batched_augment.py --threads 2
    python benchmarks/batched_augment.py --tiny
"""

from __future__ import annotations

import argparse
import time

import torch

from convmixer_pl.data import CIFAR_MEAN, CIFAR_STD, Augmentation
from convmixer_pl.data.augment import CIFAR_SCRIPT
from convmixer_pl.data.device import BatchAugment

RECIPES = {
    "script": CIFAR_SCRIPT,
    "25ep": Augmentation(scale=(1.0, 1.0), ratio=(1.0, 1.0), ra_num_ops=2, ra_magnitude=12),
    "crop": Augmentation(scale=(0.75, 1.0), ratio=(1.0, 1.0), re_prob=0.25),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_image_rate(augment: Augmentation, images: torch.Tensor, batch: int) -> float:
    """images/s of torchvision's per-image pipeline, batches collated with `torch.stack` as a DataLoader does."""
    pipeline = augment.train_transform(32, CIFAR_MEAN, CIFAR_STD)
    pipeline(images[0])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        torch.stack([pipeline(image) for image in images[i:i + batch]])
    return len(images) / (time.perf_counter() - start)


def batched_rate(augment: Augmentation, images: torch.Tensor, batch: int, device: torch.device) -> float:
    """images/s of `BatchAugment` on `device`, its generator reseeded per batch as `DeviceLoader` does."""
    transform = BatchAugment.from_augmentation(augment, 32, CIFAR_MEAN, CIFAR_STD)
    images, generator = images.to(device), torch.Generator(device=device)
    for i in range(2):  # warm-up: first calls, the tables on the device
        transform(images[:batch], generator.manual_seed(i))
    sync(device)
    start = time.perf_counter()
    for b, i in enumerate(range(0, len(images), batch)):
        transform(images[i:i + batch], generator.manual_seed(b))
    sync(device)
    return len(images) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=["script", "25ep"])
    p.add_argument("--batch", type=int, nargs="+", default=[128, 512])
    p.add_argument("--images", type=int, default=8192, help="images per batched measurement")
    p.add_argument("--per-image-images", type=int, default=2048, help="images per per-image measurement")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--tiny", action="store_true", help="a few batches: checks that it runs, timings meaningless")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        args.images, args.per_image_images = 2 * max(args.batch), max(args.batch)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    print(f"CIFAR 32 px, {torch.get_num_threads()} CPU threads, torch {torch.__version__}"
          + (" (tiny: timings meaningless)" if args.tiny else ""))
    print(f"{'recipe':>7} {'batch':>6} {'per-image CPU':>14} " + " ".join(f"{'batched ' + d.type:>14} {'x':>6}"
                                                                         for d in devices))
    for name in args.recipes:
        augment = RECIPES[name]
        for batch in args.batch:
            reference = per_image_rate(augment, images[:args.per_image_images], batch)
            row = f"{name:>7} {batch:>6} {reference:>14,.0f} "
            for device in devices:
                rate = batched_rate(augment, images, batch, device)
                row += f"{rate:>14,.0f} {rate / reference:>5.1f}x "
            print(row.rstrip())


if __name__ == "__main__":
    main()
