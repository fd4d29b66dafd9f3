"""Pictures of what a ConvMixer learned: training curves, the test confusion matrix, and, as in the paper's figures,
the depthwise kernels and patch-embedding filters as grids.

    convmixer plots --ckpt_path checkpoints/digits/last.ckpt --out docs/images   (or python -m convmixer_pl.plots)

The kernel and filter grids need only torchvision. The curves and the confusion matrix need matplotlib (a
dependency); without it they are skipped with a note, and the confusion matrix is still saved as
`confusion_matrix.csv`. `convmixer fit` writes the first three through `callbacks.PlotWriter` and
`convmixer test` the confusion matrix through `callbacks.PerClassReport`.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
from pathlib import Path

import torch
from torch.nn import functional as F
from torchvision.utils import make_grid, save_image

from .checkpoints import load_module
from .console import run_entry_point, say
from .model import ConvMixer

CURVES, CONFUSION, KERNELS, FILTERS = ("training_curves.png", "confusion_matrix.png", "depthwise_kernels.png",
                                       "patch_embeddings.png")
MATPLOTLIB_MISSING = "matplotlib is not installed (pip install matplotlib)"


def has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _upscale(images: torch.Tensor, size: int) -> torch.Tensor:
    """Nearest-neighbour upscaling so that 2x2 or 5x5 weights show as visible squares."""
    factor = max(1, math.ceil(size / images.shape[-1]))
    return F.interpolate(images, scale_factor=factor, mode="nearest")


def _grid(weights: torch.Tensor, nrow: int, size: int) -> torch.Tensor:
    # each kernel/filter scaled to its own range, as in the paper's figures, up to 0.8 so the white gaps show
    x = weights.float()
    low, high = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
    x = 0.8 * (x - low) / (high - low).clamp_min(1e-12)
    return make_grid(_upscale(x, size), nrow=nrow, padding=3, pad_value=1.0)


def depthwise_kernel_grid(model: ConvMixer, layers: int = 6, per_layer: int = 64, size: int = 24) -> torch.Tensor:
    """The first `per_layer` depthwise kernels of up to `layers` evenly spaced blocks, one square panel per block,
    left (first block) to right (last)."""
    depth, n = len(model.blocks), min(layers, len(model.blocks))
    chosen = sorted({round(i * (depth - 1) / max(1, n - 1)) for i in range(n)})
    panels = []
    for i in chosen:
        weight = model.blocks[i][0].fn[0].weight.detach().cpu()[:per_layer]  # (dim, 1, k, k)
        panels.append(_grid(weight, nrow=math.ceil(math.sqrt(len(weight))), size=size))
    return make_grid(torch.stack(panels), nrow=len(panels), padding=6, pad_value=1.0)


def patch_embedding_grid(model: ConvMixer, limit: int = 256, size: int = 16) -> torch.Tensor:
    """The patch-embedding filters (the stem convolution), in colour for RGB models."""
    weight = model.stem[0].weight.detach().cpu()[:limit]  # (dim, in_chans, p, p)
    if weight.shape[1] not in (1, 3):
        weight = weight.mean(1, keepdim=True)
    return _grid(weight, nrow=math.ceil(math.sqrt(len(weight))), size=size)


def save_weight_grids(model: ConvMixer, out_dir: str | os.PathLike) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_image(depthwise_kernel_grid(model), out / KERNELS)
    save_image(patch_embedding_grid(model), out / FILTERS)
    return [out / KERNELS, out / FILTERS]


def read_metrics(path: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """`metrics.csv` of Lightning's CSVLogger as {metric: [(epoch, value), ...]}, epoch-level rows only."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            if not row.get("epoch"):
                continue
            for key, value in row.items():
                if key not in ("epoch", "step") and value not in ("", None) and not key.endswith("_step"):
                    series.setdefault(key, []).append((int(row["epoch"]), float(value)))
    return series


def plot_curves(metrics_csv: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Loss and top-1 accuracy by epoch, training and validation (needs matplotlib)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    series = read_metrics(metrics_csv)
    panels = (("loss", ("train/loss_epoch", "val/loss")), ("top-1 accuracy", ("train/acc1", "val/acc1")))
    if not any(key in series for _, keys in panels for key in keys):
        raise ValueError(f"{metrics_csv} holds no train/val loss or acc1 by epoch; pass the log of a `convmixer fit`")
    figure = Figure(figsize=(9, 3.4), layout="constrained")
    for ax, (title, keys) in zip(figure.subplots(1, 2), panels, strict=True):
        for key in keys:
            if key in series:
                epochs, values = zip(*sorted(series[key]), strict=True)
                ax.plot([e + 1 for e in epochs], values, marker="o", markersize=3,
                        label=key.replace("_epoch", ""))
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    figure.savefig(path, dpi=100)
    return Path(path)


def plot_confusion_matrix(confmat: torch.Tensor, class_names: list[str], path: str | os.PathLike) -> Path:
    """Rows: true class, columns: predicted class; torchmetrics draws it (needs matplotlib)."""
    from matplotlib.figure import Figure
    from torchmetrics.classification import MulticlassConfusionMatrix

    n = len(class_names)
    side = min(12.0, 3 + 0.45 * n)
    figure = Figure(figsize=(side, side), layout="constrained")
    ax = figure.subplots()
    MulticlassConfusionMatrix(n).plot(val=confmat, ax=ax, labels=class_names, add_text=n <= 20)
    if max(len(name) for name in class_names) <= 3:
        ax.tick_params(labelrotation=0)  # short names read better upright
    ax.set_title(f"test confusion matrix ({int(confmat.sum())} images)")
    figure.savefig(path, dpi=100)
    return Path(path)


def save_confusion_csv(confmat: torch.Tensor, class_names: list[str], path: str | os.PathLike) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true \\ predicted", *class_names])
        for name, row in zip(class_names, confmat.tolist(), strict=True):
            writer.writerow([name, *row])
    return Path(path)


def read_confusion_csv(path: str | os.PathLike) -> tuple[torch.Tensor, list[str]]:
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return torch.tensor([[int(v) for v in row[1:]] for row in rows[1:]]), rows[0][1:]


def _newest(paths, accept=lambda path: True) -> Path | None:
    found = [path for path in paths if accept(path)]
    return max(found, key=lambda path: path.stat().st_mtime) if found else None


def _has_training(metrics_csv: Path) -> bool:
    with open(metrics_csv, newline="") as handle:
        return any(name.startswith("train/") for name in next(csv.reader(handle), []))


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="convmixer plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by `convmixer fit`")
    parser.add_argument("--log_dir", help="folder searched (with sub-folders) for the newest metrics.csv of a fit "
                                          "and confusion_matrix.csv of a test; default: the checkpoint's folder")
    parser.add_argument("--out", default="plots", help="folder for the PNGs (default: ./plots)")
    args = parser.parse_args(argv)
    return run_entry_point(lambda: _make_all(Path(args.ckpt_path), Path(args.log_dir) if args.log_dir else None,
                                             Path(args.out)), prog="convmixer plots")


def _make_all(ckpt_path: Path, log_dir: Path | None, out: Path) -> list[Path]:
    module = load_module(ckpt_path)
    log_dir = log_dir or ckpt_path.parent
    if not log_dir.is_dir():
        raise ValueError(f"--log_dir {log_dir}: no such folder")
    written = save_weight_grids(module.model, out)
    metrics = _newest(log_dir.rglob("metrics.csv"), _has_training)
    confusion = _newest(log_dir.rglob("confusion_matrix.csv"))
    for name, source, hint in ((CURVES, metrics, "run `convmixer fit` with the CSV logger (the default)"),
                               (CONFUSION, confusion, "run `convmixer test` first")):
        if source is None:
            say(f"no {name}: nothing to draw it from under {log_dir}/; {hint}")
        elif not has_matplotlib():
            say(f"no {name}: {MATPLOTLIB_MISSING}")
        elif name == CURVES:
            written.append(plot_curves(source, out / CURVES))
        else:
            written.append(plot_confusion_matrix(*read_confusion_csv(source), out / CONFUSION))
    say(f"plots written to {out}/: {', '.join(path.name for path in written)}")
    return written


if __name__ == "__main__":
    main()
