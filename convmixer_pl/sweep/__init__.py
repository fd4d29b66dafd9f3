"""`convmixer sweep`: a search over `convmixer fit` options as an Optuna study, resumable, on one machine or many.

Every trial is a `convmixer fit` subprocess in `<out_dir>/trials/<number>/` (`trials.py`): a crashed trial is FAIL
and the sweep goes on, a pruned one gets SIGTERM. The study lives in an Optuna storage (`storage.py`); several
workers on one study share its trials, running the command again continues it, and a dead worker's trial (no
heartbeat) is failed and queued again. A worker stops when the study has `n_trials` finished (complete or pruned)
trials, waiting for those other workers run, then writes the results (`results.py`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import optuna
from optuna.trial import TrialState

from ..console import say
from .options import FINISHED, SweepError, check_at_least, make_plan, make_pruner, make_sampler, parse_space
from .results import write_results
from .storage import HeartbeatJournalStorage, check_existing_study, hide_password, open_storage, open_study
from .trials import StopSignals, TrialFailed, TrialRunner, fit_config

__all__ = ["HeartbeatJournalStorage", "SweepError", "open_storage", "parse_space", "sweep"]

MAX_FAILURES_IN_A_ROW = 3  # then the worker stops: the trials fail for a reason a new trial will not fix


def sweep(base_config: str, space: dict[str, Any], objective: str = "val/acc1",
          direction: Literal["maximize", "minimize"] = "maximize", n_trials: int | None = None,
          sampler: Literal["tpe", "grid", "random"] = "tpe", pruner: Literal["median", "hyperband", "none"] = "median",
          pruner_startup_trials: int = 3, pruner_warmup_epochs: int = 1, storage: str | None = None,
          study_name: str | None = None, out_dir: str | None = None, fit_args: list[str] | None = None,
          seed: int | None = None, heartbeat_interval: int = 20) -> Path:
    """Search `convmixer fit` options with Optuna: every trial a real fit; resumable; one machine or many.

    Args:
        base_config: The `convmixer fit` config every trial starts from.
        space: The options to search, as `convmixer fit` keys: a list of values (categorical), or
            `{low, high}` with optional `log: true` and `step` (integers when low and high are integers).
            The grid sampler needs lists (or ranges with a step).
        objective: The metric logged by `convmixer fit` to optimise; a trial's value is its best epoch value.
        direction: Whether the objective is to be maximized or minimized.
        n_trials: How many finished (complete or pruned) trials the study ends with, all workers together.
            Default: the grid's size for the grid sampler, 20 otherwise.
        sampler: Optuna's sampler: tpe (TPESampler), grid (GridSampler, every combination) or random.
        pruner: Optuna's pruner, fed each epoch's objective value: median, hyperband or none.
        pruner_startup_trials: The median pruner prunes nothing until this many trials have finished.
        pruner_warmup_epochs: No trial is pruned before this many epochs (Hyperband's minimum resource).
        storage: An Optuna storage URL (sqlite:///PATH, postgresql://..., mysql://...) or a journal file
            (journal:PATH or PATH.log, for a shared file system). Default: sweep.db (SQLite) in out_dir.
        study_name: The study's name in the storage. Default: the base config's file name without .yaml.
        out_dir: The sweep's folder (trials, results, the default storage). Default: sweeps/<study_name>.
        fit_args: Further `convmixer fit` options for every trial, e.g. ["--trainer.max_epochs", "5"].
        seed: The sampler's seed: a sweep run by one process is then repeatable (give several processes
            on one study no seed or different seeds, else they draw the same first points).
        heartbeat_interval: Seconds between a running trial's heartbeats; a trial whose worker is silent for
            three intervals is failed and run again.
    """
    plan = make_plan(base_config, space, objective, direction, n_trials, sampler, study_name, out_dir, fit_args)
    check_at_least(pruner_startup_trials=(pruner_startup_trials, 0), pruner_warmup_epochs=(pruner_warmup_epochs, 0),
                   heartbeat_interval=(heartbeat_interval, 1))
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own lines say what happens to each trial
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats, pictures
            opened = open_storage(storage, plan.out_dir, heartbeat_interval)
            shown = hide_password(storage or str(plan.out_dir / "sweep.db"))
            finished = check_existing_study(opened, shown, plan.study_name, direction, plan.distributions)
            if finished < plan.n_trials:  # trials will run: does `convmixer fit` take the base config and space?
                fit_config(plan, plan.first_point(), plan.study_name)
            study = open_study(opened, shown, plan.study_name, direction,
                               make_sampler(sampler, plan.distributions, seed),
                               make_pruner(pruner, pruner_startup_trials, pruner_warmup_epochs))
            with StopSignals() as signals:
                _work(study, TrialRunner(plan, signals), plan.n_trials, heartbeat_interval)
            return write_results(study, plan)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _work(study: optuna.Study, runner: TrialRunner, n_trials: int, heartbeat_interval: int) -> None:
    """Run trials until the study has `n_trials` finished ones (or a grid has none left), waiting for the trials
    other workers run: one of them may have died, and its trial is then this worker's to run again."""
    waiting_said = False
    while True:
        runner.signals.wait(0)  # a signal between two trials: no new one
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial: FAIL, and queued again
        states = [trial.state for trial in study.get_trials(deepcopy=False)]
        finished, running = sum(s in FINISHED for s in states), states.count(TrialState.RUNNING)
        grid = study.sampler if isinstance(study.sampler, optuna.samplers.GridSampler) else None
        if finished >= n_trials or (grid and TrialState.WAITING not in states and grid.is_exhausted(study)):
            return  # a grid with every combination finished (a crashed one stays FAIL) and none queued again
        if finished + running >= n_trials:
            if not waiting_said:
                say(f"{finished} of {n_trials} trials finished; waiting for the {running} still running")
                waiting_said = True
            runner.signals.wait(heartbeat_interval)
            continue
        try:
            study.optimize(runner, n_trials=1, catch=(TrialFailed,))
        except optuna.exceptions.UpdateFinishedTrialError:  # its heartbeat came too late: another worker re-runs it
            say("a trial of this worker was given up as stale and queued again; going on")
        if runner.failures_in_row >= MAX_FAILURES_IN_A_ROW:
            raise SweepError(f"{runner.failures_in_row} trials in a row failed, the last {runner.last_error}; "
                             "fix the cause (its fit.log says more) and run the sweep again")

