"""Callbacks of a `convmixer` run, one job and one file each.

- `guards.StopGuard`: SIGTERM/SIGINT save `last.ckpt` and stop; a non-finite loss or weights stop the run.
- `throughput.ThroughputCallback`: training images/s in the logs.
- `predictions.PredictionWriter`: `convmixer predict` writes one ordered CSV (and JSON).
- `plots.PlotWriter`: pictures after fit.
- `report.PerClassReport`: per-class precision, recall, F1, support and the confusion matrix after test.

The run's checkpoint callback (`RunCheckpoint`) lives in `convmixer_pl.checkpoints`, and `ResumeState` (the
random-number states of exact resume) in `convmixer_pl.resume`, each with the rest of its code.
"""

from .guards import StopGuard, TrainingStopped
from .plots import PlotWriter
from .predictions import PredictionWriter
from .report import PerClassReport
from .throughput import ThroughputCallback

__all__ = ["PlotWriter", "PredictionWriter", "StopGuard", "PerClassReport", "ThroughputCallback",
           "TrainingStopped"]
