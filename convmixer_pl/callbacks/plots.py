"""Pictures after `convmixer fit`: training curves, depthwise kernels and patch-embedding filters."""

from __future__ import annotations

import os

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from ..console import say
from ..plots import CURVES, curves, has_curves, log_folder, read_metrics, save_figure, save_weight_grids


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
        else:
            logger.save()
            metrics = logger.experiment.metrics_file_path
            series = read_metrics(metrics) if os.path.isfile(metrics) else {}
            if has_curves(series):
                written.append(save_figure(curves(series), out / CURVES))
            else:  # nothing trained in this call (a finished run resumed): no epochs to draw
                say(f"no {CURVES}: this run logged no epoch's loss or accuracy")
        say(f"plots written to {out}/: {', '.join(path.name for path in written)}")
