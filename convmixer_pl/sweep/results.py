"""What a sweep leaves in its folder: trials.csv and the printed table, best.yaml (the best trial's full
`convmixer fit` config) and Optuna's own matplotlib pictures, each written beside its name and moved into place."""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from ..console import say
from ..files import atomic_write
from .options import FINISHED, Plan
from .trials import fit_config, shown

PICTURES = {"history.png": "plot_optimization_history", "params.png": "plot_slice",
            "curves.png": "plot_intermediate_values"}


def write_results(study: optuna.Study, plan: Plan) -> Path:
    """trials.csv, the table on stdout, best.yaml and the pictures, in the sweep's folder; the CSV's path."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    keys = list(plan.distributions) + sorted({k for t in trials for k in t.params} - set(plan.distributions))
    header = ["number", "state", plan.objective, *keys, "epochs", "seconds", "worker", "error"]
    retried = {t.system_attrs["retry_history"][-1]: t.number for t in trials if t.system_attrs.get("retry_history")}
    rows = [_row(trial, keys, retried.get(trial.number)) for trial in trials]
    csv_path = plan.out_dir / "trials.csv"
    with atomic_write(csv_path, newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    print(_table(header[:-2], [row[:-2] for row in rows]), flush=True)
    if any(t.state == TrialState.COMPLETE for t in trials):
        best = study.best_trial
        path = write_best_config(best, plan)
        say(f"best: trial {best.number}, {plan.objective} {shown(best.value)}; train it again with "
            f"`convmixer fit --config {path}`")
        draw_pictures(study, plan.out_dir, plan.objective)
    say(f"{sum(t.state in FINISHED for t in trials)} of {plan.n_trials} trials finished: {csv_path}")
    return csv_path


def _row(trial: FrozenTrial, keys: list[str], retried_as: int | None) -> list[str]:
    value = trial.value if trial.state == TrialState.COMPLETE else (  # a pruned trial: its last reported value
        trial.intermediate_values[max(trial.intermediate_values)] if trial.intermediate_values else None)
    seconds = None if trial.duration is None else round(trial.duration.total_seconds(), 1)
    cells = [trial.number, trial.state.name, value, *(trial.params.get(key) for key in keys),
             trial.user_attrs.get("epochs"), seconds, trial.user_attrs.get("worker"), trial.user_attrs.get("error")]
    if trial.state == TrialState.FAIL:
        cells[-1] = cells[-1] or "its worker stopped"  # failed by another worker: its own stopped beating
        cells[-1] += f"; run again as trial {retried_as}" if retried_as is not None else ""
    return ["" if cell is None else shown(cell) for cell in cells]


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [header, ["-" * width for width in widths], *rows]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True))
                     for line in lines)


def write_best_config(best: FrozenTrial, plan: Plan) -> Path:
    """best.yaml: the best trial's full `convmixer fit` config, as that trial ran, to train it again under its own
    name, with checkpoints in checkpoints/<study_name>_best/ instead of the trial's folder."""
    folder = plan.out_dir / "trials" / str(best.number)  # as this worker sees the sweep's folder
    saved = sorted(folder.glob("lightning_logs/version_*/config.yaml"), key=os.path.getmtime)
    name = f"{plan.study_name}_best"
    # written by the trial's own `convmixer fit`; else the trial ran on another machine: the same config, made again
    config = yaml.safe_load(saved[-1].read_text()) if saved else fit_config(plan, best.params, name)
    config["name"] = name
    config.setdefault("checkpoint", {})["dirpath"] = None
    config.setdefault("trainer", {})["default_root_dir"] = None
    path = plan.out_dir / "best.yaml"
    with atomic_write(path) as handle:
        handle.write(f"# The best trial ({best.number}) of sweep {plan.study_name}: {plan.objective} "
                     f"{shown(best.value)} with {', '.join(f'{k} {shown(v)}' for k, v in best.params.items())}.\n"
                     f"#   convmixer fit --config {path}\n")
        yaml.safe_dump(config, handle, sort_keys=False)
    return path


def draw_pictures(study: optuna.Study, out_dir: Path, objective: str) -> None:
    """Optuna's own matplotlib pictures: the objective by trial (history.png), against each option (params.png),
    and by epoch for every trial, pruned ones included (curves.png)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, also on a machine with a display
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    for file_name, function in PICTURES.items():
        kwargs = {} if function == "plot_intermediate_values" else {"target_name": objective}
        with warnings.catch_warnings():  # one value of an option: matplotlib widens its axis itself, and says so
            warnings.filterwarnings("ignore", "Attempting to set identical low and high xlims")
            axes = getattr(optuna_plots, function)(study, **kwargs)
        first = axes.flat[0] if hasattr(axes, "flat") else axes
        if function == "plot_slice":
            first.figure.set_size_inches(1.5 + 3.5 * getattr(axes, "size", 1), 4)
        elif function == "plot_intermediate_values":
            first.set(xlabel="epoch (0 is the first)", ylabel=objective)
        try:
            with atomic_write(out_dir / file_name, "wb") as handle:
                first.figure.savefig(handle, format="png", dpi=100, bbox_inches="tight")
        finally:
            plt.close(first.figure)  # pyplot keeps every figure until told
