"""Pictures: written after fit/test and by `convmixer plots`, each a titled, labelled, scaled, non-blank PNG of the
right size; and `read_metrics`, the one reader of a run's metrics.csv."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from convmixer_pl.callbacks.plots import PlotWriter
from convmixer_pl.files import OutputError
from convmixer_pl.model import ConvMixer
from convmixer_pl.plots import (
    CONFUSION,
    CURVES,
    FILTERS,
    KERNELS,
    confusion_matrix,
    curves,
    depthwise_kernels,
    patch_embeddings,
    plots,
    read_metrics,
    tile,
)

# figure sizes in inches at 100 dpi; TINY_DIGITS has 2 blocks and 10 classes
SIZES = {CURVES: (900, 360), CONFUSION: (850, 750), KERNELS: (620, 460), FILTERS: (500, 560)}


def assert_picture(path: Path, size: tuple[int, int]) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as image:
        assert image.size == size, path
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    assert pixels.std() > 10, f"{path} is (nearly) blank"


def image_axes(figure):
    return [ax for ax in figure.axes if ax.images and ax.get_label() != "<colorbar>"]


def colorbar_labels(figure) -> list[str]:
    return [ax.get_xlabel() or ax.get_ylabel() for ax in figure.axes if ax.get_label() == "<colorbar>"]


def test_fit_and_test_write_their_pictures(digits_run):
    logs = digits_run / "lightning_logs"
    for name in (CURVES, KERNELS, FILTERS):
        assert_picture(logs / "version_0" / "plots" / name, SIZES[name])
    assert_picture(logs / "version_1" / "report" / CONFUSION, SIZES[CONFUSION])
    counts = (logs / "version_1" / "report" / "confusion_matrix.csv").read_text().splitlines()
    assert len(counts) == 11 and sum(int(v) for line in counts[1:] for v in line.split(",")[1:]) == 359


def test_plots_command_draws_all_four_beside_the_run_by_default(digits_run, tmp_path):
    run = shutil.copytree(digits_run, tmp_path / "run")
    assert plots(ckpt_path=str(run / "last.ckpt")) == run / "plots"
    for name, size in SIZES.items():
        assert_picture(run / "plots" / name, size)
    assert plots(ckpt_path=str(run / "last.ckpt"), out=str(tmp_path / "images")) == tmp_path / "images"
    assert sorted(path.name for path in (tmp_path / "images").iterdir()) == sorted(SIZES)


def test_every_picture_has_a_title_axis_labels_and_a_scale():
    rgb = ConvMixer(dim=12, depth=3, kernel_size=5, patch_size=3, in_chans=3, num_classes=4)
    grey = ConvMixer(dim=9, depth=1, kernel_size=3, patch_size=2, in_chans=1, num_classes=4)
    series = {"train/loss_epoch": [(0, 2.0), (1, 1.0)], "val/loss": [(0, 2.1), (1, 1.5)],
              "train/acc1": [(0, 0.3), (1, 0.6)], "val/acc1": [(0, 0.25), (1, 0.5)]}
    confmat = torch.tensor([[5, 1], [2, 7]])
    for figure, scale in ((depthwise_kernels(rgb), "weight"), (patch_embeddings(grey), "weight"),
                          (confusion_matrix(confmat, ["a", "b"]), "images")):
        assert (figure.get_suptitle() or image_axes(figure)[0].get_title()), figure
        for i, ax in enumerate(image_axes(figure)):
            assert ax.get_title() and ax.get_xlabel() and (i > 0 or ax.get_ylabel())
        assert set(colorbar_labels(figure)) == {scale}
    kernels = depthwise_kernels(rgb)
    assert len(colorbar_labels(kernels)) == 3  # each block on its own scale
    assert "5×5 kernels of channels 0-11 (of 12)" in kernels.get_suptitle()
    colour = patch_embeddings(rgb)  # colour filters: one stated scale instead of a colour bar
    (ax,) = image_axes(colour)
    assert "mid-grey is 0, full colour ±" in ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    drawn = curves(series)
    assert drawn.get_suptitle()
    for ax in drawn.axes:
        assert ax.get_title() and ax.get_xlabel() == "epoch" and ax.get_ylabel() and len(ax.get_lines()) == 2


def test_kernel_panels_show_each_chosen_blocks_own_weights():
    model = ConvMixer(dim=9, depth=5, kernel_size=5, patch_size=2, in_chans=3, num_classes=2)
    figure = depthwise_kernels(model, layers=3)
    axes = image_axes(figure)
    assert [ax.get_title() for ax in axes] == ["block 1", "block 3", "block 5"]
    for ax, i in zip(axes, (0, 2, 4), strict=True):
        weights = model.blocks[i][0].fn[0].weight.detach().numpy()
        np.testing.assert_array_equal(ax.images[0].get_array().filled(np.nan), tile(weights, 3)[..., 0])


def test_plots_command_names_a_missing_log_dir_and_an_output_in_the_way(digits_run, tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match=f"^--log_dir {missing}: no such folder$"):
        plots(ckpt_path=str(digits_run / "last.ckpt"), log_dir=str(missing), out=str(tmp_path / "out"))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(OutputError, match=f"^cannot write {a_file / KERNELS}: a file is in the way"):
        plots(ckpt_path=str(digits_run / "last.ckpt"), out=str(a_file))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"] and a_file.read_text() == "mine"


def test_read_metrics_takes_a_resumed_runs_appended_rows(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(
        "epoch,lr-AdamW/pg1,step,train/loss_epoch,train/loss_step,val/acc1\n"
        ",0.01,0,,,\n"  # the learning-rate monitor's rows have no epoch
        "0,,4,,2.5,\n"
        "0,,4,,,0.4\n"
        "0,,4,2.25,,\n"
        "1,,9,,,0.5\n"  # the run was stopped here, in epoch 1, and resumed from its end-of-epoch-0 checkpoint
        "epoch,step,train/acc1,train/loss_epoch,val/acc1\n"  # the resumed run's header, with a new column
        "1,9,0.625,1.75,\n"
        "1,9,,,0.55\n"
        "2,14,0.75,1.5,0.6\n"
        "3,19,0.8")  # cut off by a kill: left out
    assert read_metrics(path) == {
        "train/loss_epoch": [(0, 2.25), (1, 1.75), (2, 1.5)],
        "val/acc1": [(0, 0.4), (1, 0.55), (2, 0.6)],  # the resumed run's epoch 1 replaces the stopped one's
        "train/acc1": [(1, 0.625), (2, 0.75)],
    }


def test_plot_writer_after_a_fit_that_trained_nothing_says_so_and_draws_the_rest(tmp_path, capsys):
    logger = CSVLogger(tmp_path)  # no metrics.csv: a finished run resumed with --ckpt_path last logs nothing
    trainer = SimpleNamespace(log_dir=str(tmp_path), default_root_dir=str(tmp_path), is_global_zero=True,
                              loggers=[logger])
    model = ConvMixer(dim=4, depth=1, kernel_size=3, patch_size=2, in_chans=1, num_classes=2)
    PlotWriter().on_fit_end(trainer, SimpleNamespace(model=model))
    assert sorted(path.name for path in (tmp_path / "plots").iterdir()) == sorted([FILTERS, KERNELS])
    assert f"no {CURVES}: this run logged no epoch's loss or accuracy" in capsys.readouterr().err
