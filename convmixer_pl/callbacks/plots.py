"""Pictures after `convmixer fit`: training curves, depthwise kernels and patch-embedding filters."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from ..console import say
from ..plots import CURVES, MATPLOTLIB_MISSING, has_matplotlib, plot_curves, save_weight_grids


def log_folder(trainer, out_dir: str | None, name: str) -> Path:
    """`out_dir`, or `<log dir>/<name>/` (checkpoints/<run>/lightning_logs/version_N/<name>/)."""
    log_dir = trainer.log_dir  # a collective under DDP: every rank asks
    return Path(out_dir) if out_dir else Path(log_dir or trainer.default_root_dir) / name


class PlotWriter(Callback):
    """After `fit`: training curves (from the CSV logger's metrics.csv), depthwise kernels and patch-embedding
    filters, as PNGs in `<log dir>/plots/`.

    Args:
        enabled: write the pictures.
        out_dir: another folder for them.
    """

    def __init__(self, enabled: bool = True, out_dir: str | None = None) -> None:
        self.enabled, self.out_dir = enabled, out_dir

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self.enabled:
            return
        out = log_folder(trainer, self.out_dir, "plots")
        if not trainer.is_global_zero:
            return
        written = save_weight_grids(pl_module.model, out)
        logger = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        if logger is None:
            say(f"no {CURVES}: it is drawn from the CSV logger's metrics.csv, and no CSVLogger is in use")
        elif not has_matplotlib():
            say(f"no {CURVES}: {MATPLOTLIB_MISSING}")
        else:
            logger.save()
            written.append(plot_curves(logger.experiment.metrics_file_path, out / CURVES))
        say(f"plots written to {out}/: {', '.join(path.name for path in written)}")
