"""One trial: a `convmixer fit` subprocess in its own folder, its epochs read from its metrics.csv and reported to
Optuna's pruner, stopped with SIGTERM (it saves last.ckpt) when pruned, interrupted or when the sweep dies."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import Trial, TrialState

from ..benchmark import run_metrics
from ..callbacks.guards import Interrupted
from ..console import say
from .options import FINISHED, Plan, SweepError, suggest

POLL_SECONDS = 1.0  # how often a running trial's metrics.csv is read (and a stop signal looked for)
STOP_SECONDS = 120  # a trial told to stop (SIGTERM) saves last.ckpt first; after this long it is killed


class TrialFailed(Exception):
    """A trial's `convmixer fit` failed, or the trial was not needed: the trial is FAIL and the sweep goes on."""


class StopSignals:
    """SIGTERM (a scheduler's time limit or preemption, scancel) or SIGINT (Ctrl-C), while installed: noted, acted
    on at the sweep's next poll (a raising handler could be lost where it interrupts); a second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # only it can have signal handlers
            self._previous = {signum: signal.signal(signum, self._note) for signum in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore()

    def _note(self, signum: int, frame) -> None:
        self.signum = signum
        self.event.set()
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    def wait(self, seconds: float) -> None:
        """Sleep, and raise `Interrupted` (the command then exits with 128 + the signal) if a signal came."""
        if self.event.wait(seconds):
            raise Interrupted(self.signum, f"stopped by {self.name}; run the same command again to continue")


def fit_command(*args: str) -> list[str]:
    """`convmixer ARGS`, run by this Python with this package (whichever `convmixer` is on PATH)."""
    return [sys.executable, "-m", "convmixer_pl.cli", *args]


def option_args(params: dict[str, Any]) -> list[str]:
    """`--key value` for each option, as `convmixer fit` reads them."""
    return [arg for key, value in params.items()
            for arg in (f"--{key}", "null" if value is None else str(value).lower() if isinstance(value, bool)
                        else str(value))]


def fit_config(plan: Plan, params: dict[str, Any], name: str) -> dict:
    """The full config `convmixer fit` makes of the base config, fit_args and `params` (its --print_config); a
    key or value it refuses is one line naming it."""
    command = fit_command("fit", "--config", plan.base_config, *plan.fit_args, "--name", name, *option_args(params),
                          "--print_config")
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    if result.returncode == 0:
        return yaml.safe_load(result.stdout)
    message = error_line(result.stderr).split(" (`", 1)[0]  # without its `... --help` hint: ours follows
    culprit = next((f"space.{key}" for key in params if key in message), None)
    if culprit is None and any(arg in message for arg in plan.fit_args if arg.startswith("--")):
        culprit = "fit_args"
    raise SweepError(f"{culprit or f'base_config {plan.base_config}'}: `convmixer fit` does not take it: {message} "
                     "(`convmixer fit --help` lists the options)")


def error_line(output: str) -> str:
    """The project's one error line in a command's output, else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("convmixer: error:")]
    return (errors or lines or ["no output"])[-1].removeprefix("convmixer: error:").strip()


def shown(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class TrialRunner:
    """Optuna's objective: one trial, one `convmixer fit` subprocess, its epochs reported to the pruner."""

    def __init__(self, plan: Plan, signals: StopSignals) -> None:
        self.plan, self.signals = plan, signals
        self.failures_in_row = 0
        self.last_error = ""

    def __call__(self, trial: Trial) -> float:
        self._skip_if_not_needed(trial)
        params = {key: suggest(trial, key, d) for key, d in self.plan.distributions.items()}
        folder = self.plan.out_dir / "trials" / str(trial.number)
        folder.mkdir(parents=True, exist_ok=True)
        trial.set_user_attr("folder", str(folder))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        say(f"trial {trial.number} ({', '.join(f'{k} {shown(v)}' for k, v in params.items())}) starts: "
            f"{folder / 'fit.log'}")
        command = fit_command("fit", "--config", self.plan.base_config, *self.plan.fit_args,
                              "--name", f"{self.plan.study_name}_trial{trial.number}",
                              "--checkpoint.dirpath", str(folder), "--trainer.default_root_dir", str(folder),
                              *option_args(params))
        code, values = self._train(trial, command, folder)
        if code != 0:
            self._failed(trial, f"exit code {code}: {error_line(_tail(folder / 'fit.log'))}")
        if not values:
            self._failed(trial, f"no {self.plan.objective} in its metrics.csv ({_logged(folder)})")
        self.failures_in_row = 0
        best = max(values) if self.plan.maximize else min(values)
        say(f"trial {trial.number}: {self.plan.objective} {shown(best)} (best of {len(values)} epochs)")
        return best

    def _skip_if_not_needed(self, trial: Trial) -> None:
        """Fail at once a trial started while the last ones needed were already running (two workers asking at
        the same moment): `n_trials` lower-numbered trials are finished or running."""
        ahead = trial.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
        if sum(t.number < trial.number for t in ahead) >= self.plan.n_trials:
            trial.set_user_attr("error", f"not run: the study had its {self.plan.n_trials} trials")
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
                logged = _read_run_metrics(folder, before).get(self.plan.objective, {})
                for epoch, value in [(epoch, value) for epoch, value in logged.items() if epoch not in values]:
                    values[epoch] = value
                    trial.report(value, epoch)
                    if trial.should_prune():  # epochs read after this one in the same poll do not count
                        self._prune(trial, child, epoch, value, sum(e <= epoch for e in values))
                if code is not None:
                    self.signals.wait(0)  # a Ctrl-C, or a scheduler's SIGTERM, reaches the fit too: queued again
                    trial.set_user_attr("epochs", len(values))
                    return code, list(values.values())
                self.signals.wait(POLL_SECONDS)
        except Interrupted:
            _stop(child)
            _queue_again(trial, f"stopped by {self.signals.name}")
            raise Interrupted(self.signals.signum, f"stopped by {self.signals.name}: trial {trial.number} failed and "
                              "queued again; run the same command again to continue") from None
        except BaseException:
            _stop(child)
            raise

    def _prune(self, trial: Trial, child: subprocess.Popen, epoch: int, value: float, epochs: int) -> None:
        _stop(child)
        trial.set_user_attr("epochs", epochs)
        say(f"trial {trial.number} pruned after {epochs} epochs: {self.plan.objective} {shown(value)}")
        raise optuna.TrialPruned(f"epoch {epoch}: {self.plan.objective} {value}")


def _logged(folder: Path) -> str:
    metrics = _read_run_metrics(folder, set())
    return "it logs " + ", ".join(sorted(metrics)) if metrics else "it logged no metrics: is trainer.logger off?"


def _read_run_metrics(folder: Path, before: set[Path]) -> dict[str, dict[int, float]]:
    """`benchmark.run_metrics` of the newest run not in the `before` log folders, {} while unreadable."""
    try:
        return run_metrics(folder, before)
    except (OSError, ValueError, csv.Error):  # being rewritten this instant: read it at the next poll
        return {}


def _queue_again(trial: Trial, why: str) -> None:
    """Queue a copy of an interrupted trial, as Optuna does for a dead worker's (a grid's too); fail this one."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    optuna.storages.RetryHeartbeatStaleTrialCallback()(trial.study, frozen)
    trial.set_user_attr("error", why)


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
