"""The sweep's options, checked before anything runs: the search space as Optuna distributions, the base config,
the numbers; and the sampler and pruner they name."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import Trial, TrialState

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # the trials n_trials counts


class SweepError(ValueError):
    """A bad sweep option, base config or storage; the message names it and says how to fix it."""


@dataclass(frozen=True)
class Plan:
    """What a sweep runs: every trial is `convmixer fit --config base_config *fit_args --<key> <value>...`."""

    base_config: str
    distributions: dict[str, BaseDistribution]
    objective: str
    maximize: bool
    n_trials: int
    study_name: str
    out_dir: Path
    fit_args: list[str]

    def first_point(self) -> dict[str, Any]:
        """One value of each option (first choice, low end), to have `convmixer fit` check the keys and types."""
        return {key: d.choices[0] if isinstance(d, CategoricalDistribution) else d.low
                for key, d in self.distributions.items()}


def make_plan(base_config: str, space: dict[str, Any], objective: str, direction: str, n_trials: int | None,
              sampler: str, study_name: str | None, out_dir: str | None, fit_args: list[str] | None) -> Plan:
    """The plan of a sweep, from options that need no subprocess and no storage to check."""
    distributions = parse_space(space, grid=sampler == "grid")
    _check_base_config(base_config)
    grid_size = math.prod(len(d.choices) for d in distributions.values()) if sampler == "grid" else None
    n_trials = n_trials if n_trials is not None else grid_size or 20
    if n_trials < 1:
        raise SweepError(f"n_trials {n_trials}: give at least 1")
    if grid_size is not None and n_trials > grid_size:
        raise SweepError(f"n_trials {n_trials} is more than the grid's {grid_size} combinations; give at most "
                         f"{grid_size} or more values in space")
    if not objective:
        raise SweepError("objective is empty; give a metric `convmixer fit` logs, e.g. val/acc1 or val/loss")
    study_name = study_name or Path(base_config).stem
    return Plan(base_config, distributions, objective, direction == "maximize", n_trials, study_name,
                Path(out_dir) if out_dir else Path("sweeps") / study_name, [str(arg) for arg in fit_args or []])


def check_at_least(**values: int) -> None:
    """Each `name=(value, least)`, one line for the first below its least."""
    for name, (value, least) in values.items():
        if value < least:
            raise SweepError(f"{name} {value}: give {least} or more")


def _check_base_config(path: str) -> None:
    """A missing file, or one that is not YAML, is said without a subprocess (`convmixer fit` checks the rest)."""
    try:
        with open(path) as handle:
            config = yaml.safe_load(handle)
    except OSError as err:
        raise SweepError(f"base_config {path}: cannot read it ({err.strerror}); give a `convmixer fit` config "
                         "such as configs/digits.yaml") from None
    except yaml.YAMLError as err:
        raise SweepError(f"base_config {path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(config, dict):
        raise SweepError(f"base_config {path}: not a `convmixer fit` config (a mapping of its options)")


def parse_space(space: dict[str, Any], grid: bool = False) -> dict[str, BaseDistribution]:
    """The search space as Optuna distributions, by `convmixer fit` key (without the leading --)."""
    if not isinstance(space, dict) or not space:
        raise SweepError("space is empty; give the options to search, e.g. space: {model.lr: {low: 0.001, "
                         "high: 0.1, log: true}, model.kernel_size: [3, 5, 7]}")
    distributions = {}
    for key, spec in space.items():
        key = str(key).removeprefix("--")
        try:
            distributions[key] = _distribution(spec, grid)
        except ValueError as err:
            raise SweepError(f"space.{key}: {err}") from None
    return distributions


def _distribution(spec: Any, grid: bool) -> BaseDistribution:
    if isinstance(spec, list | tuple):
        if not spec:
            raise ValueError("an empty list; give at least one value")
        for value in spec:
            if not (value is None or isinstance(value, bool | int | float | str)):
                raise ValueError(f"{value} is not a number, a string, true/false or null; give plain values")
        return CategoricalDistribution(list(spec))
    if not isinstance(spec, dict) or not {"low", "high"} <= spec.keys() or spec.keys() - {"low", "high", "log", "step"}:
        shown = yaml.safe_dump(spec, default_flow_style=True).strip()
        raise ValueError(f"{shown} is neither a list of values nor a range {{low, high}} (with optional log, step)")
    low, high, step = (_number(spec.get(name), name) for name in ("low", "high", "step"))
    log = bool(spec.get("log", False))
    if low > high:
        raise ValueError(f"low {low} is above high {high}; swap them")
    if log and low <= 0:
        raise ValueError(f"a log range needs low > 0, not {low}")
    if step is not None and (step <= 0 or log):
        raise ValueError(f"step {step}: give a positive step, and no step with log: true")
    integers = all(isinstance(v, int) for v in (low, high, step if step is not None else 1))
    if grid:
        if step is None:
            raise ValueError("the grid sampler needs a list of values, or a range with a step")
        values = [low + i * step if integers else round(low + i * step, 12)
                  for i in range(int(round((high - low) / step)) + 1)]
        return CategoricalDistribution([v for v in values if v <= high])
    if integers:
        return IntDistribution(low, high, log=log, step=step or 1)
    return FloatDistribution(float(low), float(high), log=log, step=None if step is None else float(step))


def _number(value: Any, name: str) -> int | float | None:
    """A number from YAML (which reads 1e-3, without a dot, as a string)."""
    if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name} {value}: give a finite number")
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} {value} is not a number") from None
    return int(number) if number.is_integer() and "." not in str(value) and "e" not in str(value).lower() else number


def suggest(trial: Trial, key: str, distribution: BaseDistribution) -> Any:
    """The sampler's value for one option of this trial."""
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(key, distribution.choices)
    suggest_number = trial.suggest_int if isinstance(distribution, IntDistribution) else trial.suggest_float
    return suggest_number(key, distribution.low, distribution.high, step=distribution.step, log=distribution.log)


def make_sampler(name: str, distributions: dict[str, BaseDistribution],
                 seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "grid":
        return optuna.samplers.GridSampler({key: d.choices for key, d in distributions.items()}, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(name: str, startup_trials: int, warmup_epochs: int) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, warmup_epochs))
    return optuna.pruners.NopPruner()
