"""Pictures of what a ConvMixer learned: training curves, the test confusion matrix, and, as in the paper's figures,
the depthwise kernels and patch-embedding filters as grids; and `read_metrics`, the one reader of `metrics.csv`.

    convmixer plots --ckpt_path checkpoints/digits/last.ckpt     # -> checkpoints/digits/plots/

Each is a titled matplotlib figure with labelled axes and a colour scale, written through `files.atomic_write`.
`fit` draws the curves and grids (`callbacks.PlotWriter`), `test` the confusion matrix (`callbacks.PerClassReport`);
`plots` draws all four again from a checkpoint and its logs.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torchvision.utils import make_grid

from .checkpoints import load_module
from .console import say
from .files import atomic_write
from .model import ConvMixer

CURVES, CONFUSION, KERNELS, FILTERS = ("training_curves.png", "confusion_matrix.png", "depthwise_kernels.png",
                                       "patch_embeddings.png")
DPI = 100
GAP = "white"  # between kernels; the diverging scale's zero is a pale grey, so the gaps stay visible


def log_folder(trainer, out_dir: str | None, name: str) -> Path:
    """`out_dir`, or `<log dir>/<name>/` (checkpoints/<run>/lightning_logs/version_N/<name>/)."""
    log_dir = trainer.log_dir  # a collective under DDP: every rank asks
    return Path(out_dir) if out_dir else Path(log_dir or trainer.default_root_dir) / name


def save_figure(figure: Figure, path: str | os.PathLike) -> Path:
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=DPI)
    return Path(path)


# -- kernel and filter grids ---------------------------------------------------------------------------------------

def tile(weights: np.ndarray, columns: int) -> np.ndarray:
    """(n, c, k, k) weights as one (H, W, c) image, row by row, with NaN in the one-pixel gaps between them."""
    grid = make_grid(torch.from_numpy(weights), columns, padding=1, pad_value=float("nan"))[:weights.shape[1]]
    grid = grid if len(weights) == 1 else grid[:, 1:-1, 1:-1]  # make_grid pads the edges too, unless one image
    return grid.permute(1, 2, 0).numpy()


def _index_axes(ax, count: int, columns: int, k: int, ylabel: bool = True) -> None:
    """Ticks at the kernels' centres: the column on x, the channel of each row's first kernel on y."""
    rows = math.ceil(count / columns)
    step = max(1, columns // 8)
    ax.set_xticks([c * (k + 1) + (k - 1) / 2 for c in range(0, columns, step)], range(0, columns, step))
    ax.set_yticks([r * (k + 1) + (k - 1) / 2 for r in range(0, rows, step)], range(0, rows * columns, step * columns))
    ax.set(xlabel="+ column", ylabel="channel" if ylabel else "")
    ax.tick_params(length=0, labelsize=8)


def _draw_grid(figure: Figure, ax, weights: np.ndarray, label: str, ylabel: bool = True) -> None:
    """One grid of one-channel weights on a symmetric diverging scale (0 in the middle), with its colour bar."""
    columns = math.ceil(math.sqrt(len(weights)))
    limit = float(np.abs(weights).max()) or 1.0
    cmap = colormaps["RdBu_r"].with_extremes(bad=GAP)
    image = ax.imshow(tile(weights, columns)[..., 0], cmap=cmap, vmin=-limit, vmax=limit, interpolation="nearest")
    _index_axes(ax, len(weights), columns, weights.shape[-1], ylabel)
    bar = figure.colorbar(image, ax=ax, orientation="horizontal", shrink=0.9, aspect=30)
    bar.set_label(label, fontsize=9)
    bar.ax.tick_params(labelsize=8)
    bar.ax.xaxis.set_major_locator(MaxNLocator(5, symmetric=True))


def depthwise_kernels(model: ConvMixer, layers: int = 6, per_layer: int = 64) -> Figure:
    """The first `per_layer` depthwise kernels of up to `layers` evenly spaced blocks, a panel (and scale) each."""
    depth = len(model.blocks)
    n = min(layers, depth)
    blocks = sorted({round(i * (depth - 1) / max(1, n - 1)) for i in range(n)})  # the first and the last included
    figure = Figure(figsize=(max(6.0, 0.4 + 2.9 * len(blocks)), 4.6), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(blocks)))
    for ax, i in zip(axes, blocks, strict=True):
        weight = model.blocks[i][0].fn[0].weight.detach().float().cpu()[:per_layer].numpy()  # (n, 1, k, k)
        _draw_grid(figure, ax, weight, "weight", ylabel=i == blocks[0])
        ax.set_title(f"block {i + 1}", fontsize=10)
    k, dim = model.blocks[0][0].fn[0].kernel_size[0], model.blocks[0][0].fn[0].out_channels
    numbers = ", ".join(str(i + 1) for i in blocks)
    which = f"all {depth} blocks" if len(blocks) == depth else f"blocks {numbers} of {depth}"
    figure.suptitle(f"Depthwise {k}×{k} kernels of channels 0-{min(per_layer, dim) - 1} (of {dim})\nin {which}, each "
                    "block on its own scale", fontsize=11)
    return figure


def patch_embeddings(model: ConvMixer, limit: int = 256) -> Figure:
    """The stem's patch-embedding filters: RGB ones in colour on one shared scale, others grey with a colour bar."""
    weight = model.stem[0].weight.detach().float().cpu()[:limit].numpy()  # (n, in_chans, p, p)
    n, in_chans, p, _ = weight.shape
    figure = Figure(figsize=(5.0, 5.6), layout="constrained")
    ax = figure.subplots()
    title = f"Patch-embedding filters: {n} of {model.stem[0].out_channels}, {p}×{p}"
    if in_chans == 3:
        limit_value = float(np.abs(weight).max()) or 1.0
        columns = math.ceil(math.sqrt(n))
        image = tile(0.5 + 0.5 * weight / limit_value, columns)
        image[np.isnan(image)] = 1.0  # white gaps
        ax.imshow(image.clip(0, 1), interpolation="nearest")
        _index_axes(ax, n, columns, p)
        title += f" × RGB\none scale: mid-grey is 0, full colour ±{limit_value:.3g}"
    else:
        label = "weight" if in_chans == 1 else f"mean weight over the {in_chans} input channels"
        _draw_grid(figure, ax, weight if in_chans == 1 else weight.mean(1, keepdims=True), label)
    ax.set_title(title, fontsize=10)
    return figure


def save_weight_grids(model: ConvMixer, out_dir: str | os.PathLike) -> list[Path]:
    out = Path(out_dir)
    return [save_figure(depthwise_kernels(model), out / KERNELS), save_figure(patch_embeddings(model), out / FILTERS)]


# -- curves --------------------------------------------------------------------------------------------------------

def read_metrics(path: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """`metrics.csv` of Lightning's CSVLogger as {metric: [(epoch, value), ...]} by epoch, epoch-level rows only;
    as a resumed run leaves it: a later row for a metric and epoch replaces the earlier, a header may repeat, and a
    last row cut short by a kill is left out."""
    latest: dict[str, dict[int, float]] = {}
    with open(path, newline="") as handle:
        rows = csv.reader(handle)
        header = next(rows, [])
        for row in rows:
            if "epoch" in row and "step" in row:  # a header written again by an appending run
                header = row
                continue
            if len(row) != len(header):
                continue  # cut short by a kill (Lightning writes every column of every row)
            record = dict(zip(header, row, strict=True))
            try:
                epoch = int(float(record.get("epoch") or "nan"))
            except ValueError:
                continue  # step-level rows (the learning rate) and cut-off rows have no epoch
            for key, value in record.items():
                if key in ("epoch", "step") or key.endswith("_step") or not value:
                    continue
                try:
                    latest.setdefault(key, {})[epoch] = float(value)
                except ValueError:
                    continue
    return {key: sorted(values.items()) for key, values in latest.items()}


CURVE_PANELS = (("loss", "cross-entropy", ("train/loss_epoch", "val/loss")),
                ("top-1 accuracy", "fraction correct", ("train/acc1", "val/acc1")))


def has_curves(series: dict[str, list[tuple[int, float]]]) -> bool:
    """Whether `read_metrics`'s answer holds anything `curves` draws."""
    return any(key in series for _, _, keys in CURVE_PANELS for key in keys)


def curves(series: dict[str, list[tuple[int, float]]]) -> Figure:
    """Loss and top-1 accuracy by epoch, training and validation (`read_metrics`'s answer)."""
    figure = Figure(figsize=(9, 3.6), layout="constrained")
    for ax, (title, unit, keys) in zip(figure.subplots(1, 2), CURVE_PANELS, strict=True):
        for key in keys:
            if key in series:
                epochs, values = zip(*series[key], strict=True)
                ax.plot([e + 1 for e in epochs], values, marker="o", markersize=3, label=key.replace("_epoch", ""))
        ax.set(title=title, xlabel="epoch", ylabel=unit)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    figure.suptitle("Training and validation by epoch", fontsize=11)
    return figure


# -- confusion matrix ----------------------------------------------------------------------------------------------

def confusion_matrix(confmat: torch.Tensor, class_names: list[str]) -> Figure:
    """Rows: true class, columns: predicted class; torchmetrics draws it, with a colour bar of image counts."""
    from torchmetrics.classification import MulticlassConfusionMatrix

    n = len(class_names)
    side = min(12.0, 3 + 0.45 * n)
    figure = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = figure.subplots()
    MulticlassConfusionMatrix(n).plot(val=confmat, ax=ax, labels=class_names, add_text=n <= 20)
    if max(len(name) for name in class_names) <= 3:
        ax.tick_params(labelrotation=0)  # short names read better upright
    figure.colorbar(ax.images[0], ax=ax, shrink=0.8, label="images")
    ax.set_title(f"Test confusion matrix ({int(confmat.sum())} images)")
    return figure


def save_confusion_csv(confmat: torch.Tensor, class_names: list[str], path: str | os.PathLike) -> None:
    with atomic_write(path, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true \\ predicted", *class_names])
        writer.writerows([name, *row] for name, row in zip(class_names, confmat.tolist(), strict=True))


def read_confusion_csv(path: str | os.PathLike) -> tuple[torch.Tensor, list[str]]:
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return torch.tensor([[int(v) for v in row[1:]] for row in rows[1:]]), rows[0][1:]


# -- convmixer plots -----------------------------------------------------------------------------------------------

def _newest(paths, accept=None) -> Path | None:
    return max(filter(accept, paths), key=lambda path: path.stat().st_mtime, default=None)


def plots(ckpt_path: str, log_dir: str | None = None, out: str | None = None) -> Path:
    """Draw a checkpoint's pictures again: curves, confusion matrix, kernels and filters.

    Args:
        ckpt_path: a checkpoint written by `convmixer fit`.
        log_dir: folder searched (with its sub-folders) for the newest metrics.csv of a fit and
            confusion_matrix.csv of a test; default: the checkpoint's folder.
        out: folder for the PNGs; default: `plots/` in the checkpoint's folder.
    """
    checkpoint = Path(ckpt_path)
    logs = Path(log_dir) if log_dir else checkpoint.parent
    if log_dir and not logs.is_dir():
        raise ValueError(f"--log_dir {logs}: no such folder")
    module = load_module(checkpoint)
    folder = Path(out) if out else checkpoint.parent / "plots"
    save_weight_grids(module.model, folder)
    metrics = _newest(logs.rglob("metrics.csv"), lambda path: has_curves(read_metrics(path)))  # a fit's, not a test's
    confusion = _newest(logs.rglob("confusion_matrix.csv"))
    if metrics is None:
        say(f"no {CURVES}: no metrics.csv of a fit under {logs}/; run `convmixer fit` with the CSV logger "
            "(the default)")
    else:
        save_figure(curves(read_metrics(metrics)), folder / CURVES)
    if confusion is None:
        say(f"no {CONFUSION}: no confusion_matrix.csv under {logs}/; run `convmixer test` first")
    else:
        save_figure(confusion_matrix(*read_confusion_csv(confusion)), folder / CONFUSION)
    return folder
