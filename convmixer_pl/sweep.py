"""`convmixer sweep`: a search over `convmixer fit` options as an Optuna study, resumable, on one machine or many.

Every trial is a `convmixer fit` subprocess with its own folder, `<out_dir>/trials/<number>/` (checkpoints, logs and
`fit.log`, the command's output), so a crashed trial is marked FAIL and the sweep goes on. While a trial trains, its
`metrics.csv` is read every few seconds and each epoch's objective value goes to Optuna's pruner; a trial the pruner
stops gets SIGTERM (it saves `last.ckpt` and exits). A complete trial's value is its best epoch value, the epoch
its best checkpoint holds.

The study lives in an Optuna storage: SQLite in the sweep's folder by default, any database URL Optuna takes, or a
journal file (`journal:PATH` or a `.log` path) on a shared file system. Several `convmixer sweep` processes on one
study share its trials, and running the command again continues it. Each running trial records a heartbeat; the
trial of a worker that died (kill -9, a lost node) is failed and queued again once its heartbeat is older than
three heartbeat intervals. A worker stops when the study has its `n_trials` finished (complete or pruned) trials,
waiting, if it must, for the trials other workers are running. It then writes `trials.csv`, `best.yaml` (the best
trial's full `convmixer fit` config) and pictures into the sweep's folder.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import optuna
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, Trial, TrialState

from .console import say
from .files import atomic_write
from .plots import read_metrics

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
POLL_SECONDS = 2.0  # how often a running trial's metrics.csv is read
STOP_SECONDS = 120  # a trial told to stop (SIGTERM) saves last.ckpt first; after this long it is killed
MAX_FAILURES_IN_A_ROW = 3  # then the sweep stops: the trials are failing for a reason a new trial will not fix
PICTURES = {"history.png": "plot_optimization_history", "params.png": "plot_slice",
            "curves.png": "plot_intermediate_values"}


class SweepError(ValueError):
    """A bad sweep option, base config or storage; the message names it and says how to fix it."""


class TrialFailed(Exception):
    """A trial's `convmixer fit` failed, or the trial was not needed: the trial is FAIL and the sweep goes on."""


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
    settings = _check_options(base_config, space, objective, n_trials, sampler, pruner_startup_trials,
                              pruner_warmup_epochs, study_name, out_dir, fit_args, heartbeat_interval)
    distributions, n_trials, study_name, folder, fit_args = settings
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own lines say what happens to each trial
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats, pictures
            opened = open_storage(storage, folder, heartbeat_interval)
            shown = _hide_password(storage or str(folder / "sweep.db"))
            finished = _check_existing_study(opened, shown, study_name, direction, distributions)
            if finished < n_trials:  # trials will run: does `convmixer fit` take the base config and the space?
                _fit_config(base_config, fit_args, _first_point(distributions), study_name)
            study = _open_study(opened, shown, study_name, direction, distributions,
                                _sampler(sampler, distributions, seed),
                                _pruner(pruner, pruner_startup_trials, pruner_warmup_epochs))
            runner = TrialRunner(base_config, fit_args, distributions, objective, direction == "maximize", folder,
                                 study_name, n_trials)
            with _sigterm_interrupts():
                _work(study, runner, n_trials, heartbeat_interval)
            return write_results(study, folder, runner)
    finally:
        optuna.logging.set_verbosity(verbosity)


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM stops the sweep as Ctrl-C does: the running trial saves, is failed and queued again."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread can have handlers
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check_options(base_config, space, objective, n_trials, sampler, startup_trials, warmup_epochs, study_name,
                   out_dir, fit_args, heartbeat_interval):
    """The options that need no subprocess and no storage, checked before either is touched."""
    distributions = parse_space(space, grid=sampler == "grid")
    _check_base_config(base_config)
    grid_size = math.prod(len(d.choices) for d in distributions.values()) if sampler == "grid" else None
    n_trials = n_trials if n_trials is not None else grid_size or 20
    if n_trials < 1:
        raise SweepError(f"n_trials {n_trials}: give at least 1")
    if grid_size is not None and n_trials > grid_size:
        raise SweepError(f"n_trials {n_trials} is more than the grid's {grid_size} combinations; give at most "
                         f"{grid_size} or more values in space")
    for name, value in (("pruner_startup_trials", startup_trials), ("pruner_warmup_epochs", warmup_epochs)):
        if value < 0:
            raise SweepError(f"{name} {value}: give 0 or more")
    if heartbeat_interval < 1:
        raise SweepError(f"heartbeat_interval {heartbeat_interval}: give a whole number of seconds, at least 1")
    if not objective:
        raise SweepError("objective is empty; give a metric `convmixer fit` logs, e.g. val/acc1 or val/loss")
    study_name = study_name or Path(base_config).stem
    folder = Path(out_dir) if out_dir else Path("sweeps") / study_name
    return distributions, n_trials, study_name, folder, [str(arg) for arg in fit_args or []]


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
        count = int(round((high - low) / step)) + 1
        values = [low + i * step if integers else round(low + i * step, 12) for i in range(count)]
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


def _first_point(distributions: dict[str, BaseDistribution]) -> dict[str, Any]:
    """One value of each option (first choice, low end), to have `convmixer fit` check the keys and types."""
    return {key: d.choices[0] if isinstance(d, CategoricalDistribution) else d.low
            for key, d in distributions.items()}


def _suggest(trial: Trial, key: str, distribution: BaseDistribution) -> Any:
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(key, distribution.choices)
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(key, distribution.low, distribution.high, step=distribution.step,
                                 log=distribution.log)
    return trial.suggest_float(key, distribution.low, distribution.high, step=distribution.step,
                               log=distribution.log)


def _sampler(name: str, distributions: dict[str, BaseDistribution], seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "grid":
        return optuna.samplers.GridSampler({key: d.choices for key, d in distributions.items()}, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _pruner(name: str, startup_trials: int, warmup_epochs: int) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, warmup_epochs))
    return optuna.pruners.NopPruner()


# ---------------------------------------------------------------------------------------------------- storage


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage (a file several machines append to) with the heartbeats its database storage has:
    Optuna then fails the trials of a dead worker and queues them again, as for a database."""

    def __init__(self, path: str, heartbeat_interval: int, stale_trial_callback: Callable) -> None:
        super().__init__(JournalFileBackend(path))
        self._heartbeat_interval = heartbeat_interval
        self._stale_trial_callback = stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, "heartbeat", time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        return [trial._trial_id for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
                if now - _last_sign_of_life(trial) > 3 * self._heartbeat_interval]

    def get_heartbeat_interval(self) -> int | None:
        return self._heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable | None:
        return self._stale_trial_callback


def _last_sign_of_life(trial: FrozenTrial) -> float:
    """When the trial last beat, or started (a re-queued trial carries the heartbeat of the one it replaces)."""
    started = trial.datetime_start.timestamp() if trial.datetime_start else time.time()
    return max(started, float(trial.system_attrs.get("heartbeat", 0.0)))


def open_storage(storage: str | None, out_dir: Path, heartbeat_interval: int) -> optuna.storages.BaseStorage:
    """The study's storage, with heartbeats and failed trials of dead workers queued again; one line if the URL
    cannot be opened."""
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)
    if storage is None:
        url = f"sqlite:///{(out_dir / 'sweep.db').resolve()}"
        _make_folder(out_dir, "out_dir")
    else:
        url = storage
    shown = _hide_password(url)
    try:
        if url.startswith("journal:") or url.endswith(".log"):
            path = Path(url.removeprefix("journal:"))
            _make_folder(path.parent, f"storage {shown}")
            return HeartbeatJournalStorage(str(path), heartbeat_interval, retry)
        return _open_database(url, heartbeat_interval, retry)
    except SweepError:
        raise
    except Exception as err:  # sqlalchemy's and the drivers' errors, a missing driver module, a bad path
        raise SweepError(f"storage {shown}: cannot open it ({_first_line(err)}); give a URL Optuna can reach, "
                         "e.g. sqlite:///sweep.db, postgresql://user@host/db or journal:/shared/sweep.log") from None


def _open_database(url: str, heartbeat_interval: int, retry: Callable) -> optuna.storages.RDBStorage:
    """Optuna's database storage. Workers started together on a new database race to create its tables; the
    loser opens it again and finds them."""
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}  # wait for locks
    for attempt in range(3):  # returns or raises
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                                              grace_period=3 * heartbeat_interval,
                                              heartbeat_stale_trial_callback=retry)
        except Exception as err:
            if attempt == 2 or not any(race in str(err) for race in ("already exists", "UNIQUE", "duplicate key")):
                raise
            time.sleep(1 + attempt)


def _make_folder(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SweepError(f"{what}: cannot create the folder {folder} ({err.strerror}); choose another") from None


def _hide_password(url: str) -> str:
    try:
        import sqlalchemy

        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a database URL (a journal path): nothing to hide
        return url


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _check_existing_study(storage, shown: str, name: str, direction: str,
                          distributions: dict[str, BaseDistribution]) -> int:
    """The number of finished trials of the study of this name, if there is one. One made to optimise the other
    way, or with another kind of range for an option, is refused in one line (Optuna would fail every trial of the
    latter)."""
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:  # no such study yet
        return 0
    except Exception as err:
        raise SweepError(f"storage {shown}: cannot read it ({_first_line(err)})") from None
    if study.direction.name.lower() != direction:
        raise SweepError(f"direction {direction}: study {name} in {shown} was made to "
                         f"{study.direction.name.lower()}; keep that, or give a new study_name")
    earlier: dict[str, BaseDistribution] = {}
    for trial in study.get_trials(deepcopy=False):
        earlier.update(trial.distributions)
    for key, distribution in distributions.items():
        try:
            if key in earlier:
                optuna.distributions.check_distribution_compatibility(earlier[key], distribution)
        except ValueError as err:
            raise SweepError(f"space.{key}: does not fit the earlier trials of study {name} ({_first_line(err)}); "
                             "keep its kind of range, or give a new study_name") from None
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def _open_study(storage, shown: str, name: str, direction: str, distributions: dict[str, BaseDistribution],
                sampler, pruner) -> optuna.Study:
    """The study, new or continued, written to once (the space it is searched with) so that a storage that
    cannot be written is found before any trial."""
    try:
        study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner,
                                    direction=direction, load_if_exists=True)
        study.set_user_attr("space", {key: repr(d) for key, d in distributions.items()})
    except Exception as err:
        raise SweepError(f"storage {shown}: cannot write study {name} ({_first_line(err)}); "
                         "give a storage you can write to") from None
    return study


# ---------------------------------------------------------------------------------------------------- trials


def fit_command(*args: str) -> list[str]:
    """`convmixer ARGS`, run by this Python with this package (no matter which `convmixer` is on PATH)."""
    return [sys.executable, "-m", "convmixer_pl.cli", *args]


def _option_args(params: dict[str, Any]) -> list[str]:
    return [arg for key, value in params.items() for arg in (f"--{key}", _cli_value(value))]


def _cli_value(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _fit_config(base_config: str, fit_args: list[str], params: dict[str, Any], name: str) -> dict:
    """The full config `convmixer fit` makes of the base config, fit_args and `params` (its --print_config); a
    key or value it refuses is one line naming it."""
    command = fit_command("fit", "--config", base_config, *fit_args, "--name", name, *_option_args(params),
                          "--print_config")
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    if result.returncode == 0:
        return yaml.safe_load(result.stdout)
    message = _error_line(result.stderr).split(" (`", 1)[0]  # without its `... --help` hint: ours follows
    culprit = next((f"space.{key}" for key in params if key in message), None)
    if culprit is None and any(arg in message for arg in fit_args if arg.startswith("--")):
        culprit = "fit_args"
    what = culprit or f"base_config {base_config}"
    raise SweepError(f"{what}: `convmixer fit` does not take it: {message} (`convmixer fit --help` lists the "
                     "options)")


def _error_line(output: str) -> str:
    """The project's one error line in a command's output, else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("convmixer: error:")]
    line = (errors or lines or ["no output"])[-1]
    return line.removeprefix("convmixer: error:").strip()


class TrialRunner:
    """Optuna's objective: one trial, one `convmixer fit` subprocess, its epochs reported to the pruner."""

    def __init__(self, base_config: str, fit_args: list[str], distributions: dict[str, BaseDistribution],
                 objective: str, maximize: bool, out_dir: Path, study_name: str, n_trials: int) -> None:
        self.base_config, self.fit_args, self.distributions = base_config, fit_args, distributions
        self.objective, self.maximize, self.out_dir = objective, maximize, out_dir
        self.study_name, self.n_trials = study_name, n_trials
        self.failures_in_row = 0
        self.last_error = ""

    def __call__(self, trial: Trial) -> float:
        self._skip_if_not_needed(trial)
        params = {key: _suggest(trial, key, d) for key, d in self.distributions.items()}
        folder = self.out_dir / "trials" / str(trial.number)
        folder.mkdir(parents=True, exist_ok=True)
        trial.set_user_attr("folder", str(folder))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        shown = ", ".join(f"{key} {_format(value)}" for key, value in params.items())
        say(f"trial {trial.number} ({shown}) starts: {folder / 'fit.log'}")
        command = fit_command("fit", "--config", self.base_config, *self.fit_args,
                              "--name", f"{self.study_name}_trial{trial.number}", "--checkpoint.dirpath", str(folder),
                              "--trainer.default_root_dir", str(folder), *_option_args(params))
        code, values = self._train(trial, command, folder)
        if code != 0:
            self._failed(trial, f"exit code {code}: {_error_line(_tail(folder / 'fit.log'))}")
        if not values:
            self._failed(trial, f"no {self.objective} in its metrics.csv ({self._logged(folder)})")
        self.failures_in_row = 0
        best = max(values) if self.maximize else min(values)
        say(f"trial {trial.number}: {self.objective} {_format(best)} (best of {len(values)} epochs)")
        return best

    def _skip_if_not_needed(self, trial: Trial) -> None:
        """Fail at once a trial started while the last ones needed were already running (two workers asking at
        the same moment): `n_trials` lower-numbered trials are finished or running."""
        ahead = trial.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
        if sum(t.number < trial.number for t in ahead) >= self.n_trials:
            trial.set_user_attr("error", f"not run: the study had its {self.n_trials} trials")
            trial.study.stop()
            raise TrialFailed("not needed")

    def _failed(self, trial: Trial, error: str) -> None:
        trial.set_user_attr("error", error)
        self.failures_in_row += 1
        self.last_error = f"trial {trial.number}: {error}"
        say(f"trial {trial.number} failed: {error}")
        raise TrialFailed(error)

    def _train(self, trial: Trial, command: list[str], folder: Path) -> tuple[int, list[float]]:
        """Run the fit, reporting each epoch's objective value; prune it (SIGTERM) when the pruner says so."""
        before = set(folder.glob("lightning_logs/version_*"))
        with open(folder / "fit.log", "ab") as log:
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_stop_with_parent())
        values: dict[int, float] = {}
        try:
            while True:
                code = child.poll()  # before reading: after the child's exit, the read is complete
                for epoch, value in self._new_values(folder, before, values):
                    trial.report(value, epoch)
                    if trial.should_prune():
                        _stop(child)
                        trial.set_user_attr("epochs", len(values))
                        say(f"trial {trial.number} pruned after {len(values)} epochs: {self.objective} "
                            f"{_format(value)}")
                        raise optuna.TrialPruned(f"epoch {epoch}: {self.objective} {value}")
                if code is not None:
                    trial.set_user_attr("epochs", len(values))
                    return code, list(values.values())
                time.sleep(POLL_SECONDS)
        except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM (a scheduler's preemption, scancel)
            _stop(child)
            _queue_again(trial, str(interrupt) or "interrupted")
            raise
        except BaseException:
            _stop(child)
            raise

    def _new_values(self, folder: Path, before: set[Path], seen: dict[int, float]) -> list[tuple[int, float]]:
        """The objective's values of epochs not seen yet (and records them in `seen`)."""
        metrics = _read_run_metrics(folder, before)
        new = [(epoch, value) for epoch, value in metrics.get(self.objective, []) if epoch not in seen]
        seen.update(new)
        return new

    def _logged(self, folder: Path) -> str:
        metrics = _read_run_metrics(folder, set())
        if not metrics:
            return "it logged no metrics: is trainer.logger off?"
        return "it logs " + ", ".join(sorted(metrics))


def _queue_again(trial: Trial, why: str) -> None:
    """Queue a copy of an interrupted trial, as Optuna does for a dead worker's (a grid's combination included),
    and fail this one."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    optuna.storages.RetryHeartbeatStaleTrialCallback()(trial.study, frozen)
    trial.set_user_attr("error", why)
    say(f"trial {trial.number} {why}; queued again: run the same command again to continue")


def _read_run_metrics(folder: Path, before: set[Path]) -> dict[str, list[tuple[int, float]]]:
    """The newest run's metrics.csv under `folder` (not one of the `before` log folders), {} while unreadable."""
    runs = [p for p in folder.glob("lightning_logs/version_*") if p not in before and (p / "metrics.csv").is_file()]
    if not runs:
        return {}
    newest = max(runs, key=lambda p: int(p.name.rsplit("_", 1)[-1]) if p.name.rsplit("_", 1)[-1].isdigit() else -1)
    try:
        return read_metrics(newest / "metrics.csv")
    except (OSError, ValueError, csv.Error):  # being rewritten this instant: read it at the next poll
        return {}


def _stop_with_parent() -> Callable[[], None] | None:
    """On Linux, the fit gets SIGTERM (saves and exits) when the sweep process dies, even by SIGKILL."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    return lambda: prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def _stop(child: subprocess.Popen) -> None:
    """SIGTERM (the fit saves last.ckpt and exits), then SIGKILL if it is still there after STOP_SECONDS."""
    if child.poll() is not None:
        return
    child.send_signal(signal.SIGTERM)
    try:
        child.wait(STOP_SECONDS)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _tail(path: Path, size: int = 65536) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - size))
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _work(study: optuna.Study, runner: TrialRunner, n_trials: int, heartbeat_interval: int) -> None:
    """Run trials until the study has `n_trials` finished ones (or a grid has none left), waiting for the trials
    other workers run: one of them may have died, and its trial is then this worker's to run again."""
    waiting_said = False
    while True:
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial: FAIL, and queued again
        states = [trial.state for trial in study.get_trials(deepcopy=False)]
        finished, running = sum(s in FINISHED for s in states), states.count(TrialState.RUNNING)
        if finished >= n_trials or _grid_done(study, states):
            return
        if finished + running >= n_trials:
            if not waiting_said:
                say(f"{finished} of {n_trials} trials finished; waiting for the {running} still running")
                waiting_said = True
            time.sleep(heartbeat_interval)
            continue
        try:
            study.optimize(runner, n_trials=1, catch=(TrialFailed,))
        except optuna.exceptions.UpdateFinishedTrialError:  # its heartbeat came too late: another worker re-runs it
            say("a trial of this worker was given up as stale and queued again; going on")
        if runner.failures_in_row >= MAX_FAILURES_IN_A_ROW:
            raise SweepError(f"{runner.failures_in_row} trials in a row failed, the last {runner.last_error}; "
                             "fix the cause (its fit.log says more) and run the sweep again")


def _grid_done(study: optuna.Study, states: list[TrialState]) -> bool:
    """A grid whose every combination has finished (a crashed one stays FAIL), with no trial queued again."""
    sampler = study.sampler
    return (isinstance(sampler, optuna.samplers.GridSampler) and TrialState.WAITING not in states
            and sampler.is_exhausted(study))


# ---------------------------------------------------------------------------------------------------- results


def write_results(study: optuna.Study, out_dir: Path, runner: TrialRunner) -> Path:
    """trials.csv, the printed table, best.yaml and the pictures, in `out_dir`; returns the CSV's path."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    keys = list(runner.distributions) + sorted({k for t in trials for k in t.params} - set(runner.distributions))
    header = ["number", "state", runner.objective, *keys, "epochs", "seconds", "worker", "error"]
    retried = {t.system_attrs["retry_history"][-1]: t.number for t in trials if t.system_attrs.get("retry_history")}
    rows = [_row(trial, keys, retried.get(trial.number)) for trial in trials]
    csv_path = out_dir / "trials.csv"
    with atomic_write(csv_path, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    print(_table(header[:-2], [row[:-2] for row in rows]), flush=True)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        path = write_best_config(best, out_dir / "best.yaml", runner)
        say(f"best: trial {best.number}, {runner.objective} {_format(best.value)}; train it with "
            f"`convmixer fit --config {path}`")
        draw_pictures(study, out_dir, runner.objective)
    say(f"{sum(t.state in FINISHED for t in trials)} of {runner.n_trials} trials finished: {csv_path}")
    return csv_path


def _row(trial: FrozenTrial, keys: list[str], retried_as: int | None) -> list[str]:
    seconds = ((trial.datetime_complete - trial.datetime_start).total_seconds()
               if trial.datetime_complete and trial.datetime_start else None)
    value = trial.value if trial.state == TrialState.COMPLETE else (
        trial.intermediate_values[max(trial.intermediate_values)] if trial.intermediate_values else None)
    cells = [trial.number, trial.state.name, value, *(trial.params.get(key) for key in keys),
             trial.user_attrs.get("epochs"), None if seconds is None else round(seconds, 1),
             trial.user_attrs.get("worker"), trial.user_attrs.get("error")]
    if trial.state == TrialState.FAIL:
        cells[-1] = cells[-1] or "its worker stopped"  # failed by another worker: its own stopped beating
        cells[-1] += f"; run again as trial {retried_as}" if retried_as is not None else ""
    return ["" if cell is None else _format(cell) if isinstance(cell, float) else str(cell) for cell in cells]


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [header, ["-" * width for width in widths], *rows]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True))
                     for line in lines)


def write_best_config(best: FrozenTrial, path: Path, runner: TrialRunner) -> Path:
    """The best trial's full `convmixer fit` config, as that trial ran, to train it again: its own name, and
    checkpoints in checkpoints/<name>/ instead of the trial's folder."""
    folder = Path(best.user_attrs.get("folder", runner.out_dir / "trials" / str(best.number)))
    saved = sorted(folder.glob("lightning_logs/version_*/config.yaml"), key=os.path.getmtime)
    name = f"{runner.study_name}_best"
    if saved:  # written by the trial's own `convmixer fit`
        config = yaml.safe_load(saved[-1].read_text())
    else:  # the trial ran on another machine, its folder is not here: the same config, made again
        config = _fit_config(runner.base_config, runner.fit_args, best.params, name)
    config["name"] = name
    config.setdefault("checkpoint", {})["dirpath"] = None
    config.setdefault("trainer", {})["default_root_dir"] = None
    params = ", ".join(f"{key} {_format(value)}" for key, value in best.params.items())
    with atomic_write(path) as handle:
        handle.write(f"# The best trial ({best.number}) of sweep {runner.study_name}: {runner.objective} "
                     f"{_format(best.value)} with {params}.\n#   convmixer fit --config {path}\n")
        yaml.safe_dump(config, handle, sort_keys=False)
    return path


def draw_pictures(study: optuna.Study, out_dir: Path, objective: str) -> list[Path]:
    """Optuna's own matplotlib pictures: the objective by trial (history.png), against each option (params.png),
    and by epoch for every trial, pruned ones included (curves.png)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, also on a machine with a display
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    paths = []
    for file_name, function in PICTURES.items():
        kwargs = {} if function == "plot_intermediate_values" else {"target_name": objective}
        axes = getattr(optuna_plots, function)(study, **kwargs)
        first = axes.flat[0] if hasattr(axes, "flat") else axes
        figure = first.figure
        if function == "plot_slice":
            figure.set_size_inches(1.5 + 3.5 * (axes.size if hasattr(axes, "size") else 1), 4)
        elif function == "plot_intermediate_values":
            first.set(xlabel="epoch (0 is the first)", ylabel=objective)
        try:
            with atomic_write(out_dir / file_name, "wb") as handle:
                figure.savefig(handle, format="png", dpi=100, bbox_inches="tight")
        finally:
            plt.close(figure)  # pyplot keeps every figure until told
        paths.append(out_dir / file_name)
    return paths

