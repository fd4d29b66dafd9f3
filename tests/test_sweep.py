"""`convmixer sweep` end to end on tiny digits runs, and its refusals of bad input.

One study is shared by the tests of this file (module-scoped fixtures, in this order): two `convmixer sweep`
processes run its first 4 trials at once on the default SQLite storage; then a worker continuing it towards 5
trials, with a hopeless learning rate, is killed with SIGKILL mid-trial, and the same command run again finishes it
(the killed trial FAIL and run again, and pruned). The objective is val/loss, which a learning rate of 10 makes
over a hundred times larger than any good trial's, so the pruning is certain on any machine. Refusals run in this
process (the command function through the console's entry point, as `convmixer sweep` calls it, and one through
`convmixer sweep` itself): each is one line and exit code 2, before any trial or subprocess where it can be.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import CONFIGS, convmixer_command, run_main

from convmixer_pl.callbacks.guards import Interrupted
from convmixer_pl.console import run_entry_point
from convmixer_pl.plots import read_metrics
from convmixer_pl.sweep import HeartbeatJournalStorage, SweepError, open_storage, parse_space, sweep

# 2 short epochs of a small ConvMixer at 8 px: about 10 s a trial on a busy 2-core machine
FIT_ARGS = ["--model.dim", "32", "--model.depth", "2", "--data.image_size", "8", "--trainer.max_epochs", "2",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--plots.enabled", "false"]
SPACE = {"model.lr": {"low": 0.02, "high": 0.08, "log": True}, "model.kernel_size": [3, 5]}
SWEEP = {"base_config": str(CONFIGS / "digits.yaml"), "space": SPACE, "objective": "val/loss",
         "direction": "minimize", "n_trials": 4, "pruner": "none", "study_name": "tiny", "fit_args": FIT_ARGS,
         "heartbeat_interval": 1}
# the continuation: a learning rate of 10 (the same kind of range, so the study takes it) and the median pruner
# from the first epoch; 40 epochs, so that the fit is still running when the sweep reads its first one
HOPELESS_EPOCHS = 40
HOPELESS = {**SWEEP, "space": {**SPACE, "model.lr": {"low": 10.0, "high": 10.0, "log": True}}, "n_trials": 5,
            "pruner": "median", "pruner_startup_trials": 2, "pruner_warmup_epochs": 0,
            "fit_args": [*FIT_ARGS, "--trainer.max_epochs", str(HOPELESS_EPOCHS)]}
TIMEOUT = 600
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning",
                                        "ignore:Heartbeat of storage is supposed to be used with Study.optimize")


def _sweep_command(config: Path) -> list[str]:
    return [convmixer_command(), "sweep", "--config", str(config)]


def _start(command: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CONVMIXER_DEBUG", None)
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> tuple[str, str]:
    out, err = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, err[-3000:]
    return out, err


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "trials.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _write(path: Path, options: dict) -> Path:
    path.write_text(yaml.safe_dump(options, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sweep")


@pytest.fixture(scope="module")
def two_workers(work) -> tuple[Path, list[str]]:
    """Two `convmixer sweep` processes started together on one study (SQLite in the sweep's folder): their
    stdout."""
    command = _sweep_command(_write(work / "tiny.yaml", SWEEP))
    workers = [_start(command, work) for _ in range(2)]
    outputs = [_finish(worker)[0] for worker in workers]
    return work / "sweeps" / "tiny", outputs


@pytest.fixture(scope="module")
def killed_and_rerun(work, two_workers) -> tuple[Path, int]:
    """The study continued towards 5 trials: the worker is killed with SIGKILL while its trial's `convmixer fit`
    runs, then the same command is run again to the end. The killed trial's number."""
    folder, _ = two_workers
    command = _sweep_command(_write(work / "hopeless.yaml", HOPELESS))
    before = set((folder / "trials").iterdir())
    worker = _start(command, work)
    deadline = time.monotonic() + TIMEOUT
    while not (started := [p for p in (folder / "trials").iterdir() if p not in before and (p / "fit.log").exists()]):
        assert worker.poll() is None and time.monotonic() < deadline, worker.communicate()[1][-3000:]
        time.sleep(0.1)
    worker.send_signal(signal.SIGKILL)  # mid-trial: the trial is RUNNING in the study and its fit has started
    worker.communicate(timeout=60)
    _finish(_start(command, work))
    return folder, int(started[0].name)


def test_two_workers_end_with_exactly_the_trials_asked_for(two_workers):
    folder, outputs = two_workers
    rows = _rows(folder)
    assert [row["state"] for row in rows].count("COMPLETE") == 4
    assert all(row["state"] in ("COMPLETE", "FAIL") for row in rows)  # a FAIL only if both asked for the 4th at once
    assert all(row["error"].startswith("not run") for row in rows if row["state"] == "FAIL")
    for row in rows:
        if row["state"] == "COMPLETE":
            assert 0.02 <= float(row["model.lr"]) <= 0.08 and row["model.kernel_size"] in ("3", "5")
            assert row["epochs"] == "2" and float(row["val/loss"]) > 0 and float(row["seconds"]) > 0
            assert (folder / "trials" / row["number"] / "last.ckpt").is_file()
    for stdout in outputs:  # each worker waits for the other's last trial, then prints the whole table
        table = stdout.splitlines()
        assert table[0].split() == ["number", "state", "val/loss", "model.lr", "model.kernel_size", "epochs",
                                    "seconds"]
        assert sum(" COMPLETE " in line for line in table) == 4


def test_best_config_trains_as_it_is(two_workers, tmp_path):
    from convmixer_pl.cli import ConvMixerCLI

    folder, _ = two_workers
    best = min((row for row in _rows(folder) if row["state"] == "COMPLETE"), key=lambda row: float(row["val/loss"]))
    config = yaml.safe_load((folder / "best.yaml").read_text())
    assert config["model"]["kernel_size"] == int(best["model.kernel_size"])
    assert f"{config['model']['lr']:.4g}" == best["model.lr"]
    assert config["name"] == "tiny_best" and config["checkpoint"]["dirpath"] is None
    ConvMixerCLI(args=["fit", "--config", str(folder / "best.yaml"), "--checkpoint.dirpath", str(tmp_path),
                       "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"])
    assert (tmp_path / "last.ckpt").is_file()


def test_pictures_are_written(two_workers):
    folder, _ = two_workers
    for name in ("history.png", "params.png", "curves.png"):
        data = (folder / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, name
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_killed_worker_trial_is_run_again_and_the_hopeless_one_pruned(killed_and_rerun):
    folder, killed = killed_and_rerun
    rows = {int(row["number"]): row for row in _rows(folder)}
    assert rows[killed]["state"] == "FAIL" and rows[killed]["error"].startswith("its worker stopped; run again as")
    again = int(rows[killed]["error"].rsplit(" ", 1)[1])
    assert rows[again]["model.lr"] == "10" and rows[again]["model.kernel_size"] == rows[killed]["model.kernel_size"]
    assert rows[again]["state"] == "PRUNED" and rows[again]["epochs"] == "1"  # judged after its first epoch,
    good = max(float(row["val/loss"]) for row in rows.values() if row["state"] == "COMPLETE")
    assert float(rows[again]["val/loss"]) > 10 * good
    metrics = read_metrics(next((folder / "trials" / str(again)).glob("lightning_logs/version_*/metrics.csv")))
    assert len(metrics["val/loss"]) < HOPELESS_EPOCHS  # and stopped before its last
    assert sum(row["state"] in ("COMPLETE", "PRUNED") for row in rows.values()) == 5


def test_running_again_a_finished_study_runs_no_trial(killed_and_rerun, capsys):
    folder, _ = killed_and_rerun
    before = _rows(folder)
    code, err = _call(capsys, **{**HOPELESS, "out_dir": str(folder), "fit_args": HOPELESS["fit_args"]})
    assert code == 0 and _rows(folder) == before
    assert "5 of 5 trials finished" in err


def test_sigterm_stops_the_sweep_and_queues_its_trial_again(tmp_path):
    """A scheduler's SIGTERM (preemption, scancel) mid-trial: the fit is stopped, the trial failed and queued again
    at once (no heartbeat to wait for), and the sweep stops with the exit code of a stop by SIGTERM."""
    folder = tmp_path / "sweep"
    done = threading.Event()

    def terminate_once_the_fit_runs() -> None:
        while not done.wait(0.1):
            if (folder / "trials" / "0" / "fit.log").exists():
                os.kill(os.getpid(), signal.SIGTERM)  # to this process, whose sweep handles it
                return

    handler = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=terminate_once_the_fit_runs, daemon=True).start()
    try:
        with pytest.raises(Interrupted, match="stopped by SIGTERM: trial 0 failed and queued again") as stopped:
            sweep(**{**SWEEP, "out_dir": str(folder), "n_trials": 1})
    finally:
        done.set()
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{folder / 'sweep.db'}").trials
    assert [t.state.name for t in trials] == ["FAIL", "WAITING"]
    assert trials[0].user_attrs["error"] == "stopped by SIGTERM" and trials[1].params == trials[0].params
    assert stopped.value.exit_code == 128 + signal.SIGTERM  # what `convmixer sweep` exits with
    assert signal.getsignal(signal.SIGTERM) == handler  # the handler of before is back


def _call(capsys, **options) -> tuple[int, str]:
    """`sweep(**options)` as the command runs it: the exit code and stderr."""
    try:
        run_entry_point(lambda: sweep(**options), "convmixer sweep")
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def _refused(capsys, **options) -> str:
    code, err = _call(capsys, **options)
    lines = [line for line in err.splitlines() if line.startswith("convmixer sweep: error:")]
    assert code == 2 and len(lines) == 1, err
    return lines[0]


def test_bad_input_leaves_an_existing_study_as_it_was(killed_and_rerun, capsys):
    folder, _ = killed_and_rerun
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{folder / 'sweep.db'}")
    trials = len(study.trials)
    existing = {**HOPELESS, "out_dir": str(folder), "n_trials": 6}
    line = _refused(capsys, **{**existing, "space": {**SPACE, "model.not_an_option": [1, 2]}})
    assert "space.model.not_an_option: `convmixer fit` does not take it" in line
    line = _refused(capsys, **{**existing, "direction": "maximize"})
    assert "direction maximize: study tiny" in line and "was made to minimize" in line
    line = _refused(capsys, **{**existing, "space": {**SPACE, "model.lr": [0.01, 0.1]}})
    assert "space.model.lr: does not fit the earlier trials of study tiny" in line
    assert len(optuna.load_study(study_name="tiny", storage=f"sqlite:///{folder / 'sweep.db'}").trials) == trials


@pytest.mark.parametrize(("change", "expected"), [
    ({"space": {}}, "space is empty"),
    ({"space": {"model.kernel_size": []}}, "space.model.kernel_size: an empty list"),
    ({"space": {"model.lr": {"low": 0.1, "high": 0.01}}}, "space.model.lr: low 0.1 is above high 0.01"),
    ({"space": {"model.lr": {"low": 0, "high": 0.1, "log": True}}}, "space.model.lr: a log range needs low > 0"),
    ({"space": {"model.lr": {"low": "fast", "high": 0.1}}}, "space.model.lr: low fast is not a number"),
    ({"space": {"model.lr": {"min": 0.1}}}, "space.model.lr: {min: 0.1} is neither a list"),
    ({"sampler": "grid"}, "space.model.lr: the grid sampler needs a list of values"),
    ({"sampler": "grid", "space": {"model.kernel_size": [3, 5]}, "n_trials": 3},
     "n_trials 3 is more than the grid's 2 combinations"),
    ({"n_trials": 0}, "n_trials 0: give at least 1"),
    ({"base_config": "no/such.yaml"}, "base_config no/such.yaml: cannot read it"),
    ({"storage": "postgresql://someone:secret@127.0.0.1:9/sweeps"},
     "storage postgresql://someone:***@127.0.0.1:9/sweeps: cannot open it"),
])
def test_bad_input_is_one_line_before_anything_runs(capsys, tmp_path, change, expected):
    line = _refused(capsys, **{**SWEEP, "out_dir": str(tmp_path / "sweep"), **change})
    assert expected in line and "secret" not in line
    assert not (tmp_path / "sweep" / "trials").exists()


def test_base_config_that_is_not_yaml_and_storage_that_cannot_be_written(capsys, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  lr: [0.1\n")
    line = _refused(capsys, **{**SWEEP, "base_config": str(broken), "out_dir": str(tmp_path / "a")})
    assert f"base_config {broken}: not valid YAML" in line
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("")
    for storage in (f"sqlite:///{in_the_way}/sweep.db", f"journal:{in_the_way}/sweep.log"):
        line = _refused(capsys, **{**SWEEP, "storage": storage, "out_dir": str(tmp_path / "b")})
        assert line.startswith(f"convmixer sweep: error: storage {storage}: cannot")


def test_the_command_refuses_in_one_line(capsys, tmp_path):
    config = _write(tmp_path / "bad.yaml", {**SWEEP, "space": {"model.lr": {"low": 0.1, "high": 0.01}}})
    code, err = run_main(capsys, "sweep", "--config", config)
    assert code == 2 and err.strip() == "convmixer sweep: error: space.model.lr: low 0.1 is above high 0.01; swap them"


def test_space_kinds():
    space = parse_space({"model.lr": {"low": "1e-3", "high": 0.1, "log": True}, "model.kernel_size": [3, 5, 7],
                         "model.depth": {"low": 2, "high": 8, "step": 2}, "data.mixup": {"low": 0, "high": 0.5}})
    assert isinstance(space["model.lr"], optuna.distributions.FloatDistribution) and space["model.lr"].log
    assert space["model.lr"].low == 0.001
    assert space["model.kernel_size"].choices == (3, 5, 7)
    assert isinstance(space["model.depth"], optuna.distributions.IntDistribution) and space["model.depth"].step == 2
    assert isinstance(space["data.mixup"], optuna.distributions.FloatDistribution)
    grid = parse_space({"--model.depth": {"low": 2, "high": 8, "step": 2}, "model.kernel_size": [3, 5]}, grid=True)
    assert grid["model.depth"].choices == (2, 4, 6, 8) and set(grid) == {"model.depth", "model.kernel_size"}
    with pytest.raises(SweepError, match="space.model.lr: step"):
        parse_space({"model.lr": {"low": 0.1, "high": 1, "log": True, "step": 0.1}})


def test_a_silent_worker_trial_is_failed_and_queued_again(tmp_path):
    """The heartbeats of both storages (SQLite, the default, and a journal file): a RUNNING trial no one beats for
    is failed and queued again by the next worker that looks, once it is older than three heartbeat intervals."""
    studies = []
    for storage in (None, f"journal:{tmp_path / 'sweep.log'}"):
        opened = open_storage(storage, tmp_path, 1)
        assert isinstance(opened, HeartbeatJournalStorage) == (storage is not None)
        study = optuna.create_study(storage=opened, study_name="s")
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        opened.record_heartbeat(trial._trial_id)  # then its worker dies
        optuna.storages.fail_stale_trials(study)
        assert [t.state for t in study.trials] == [optuna.trial.TrialState.RUNNING]  # not yet: it may still beat
        studies.append((study, trial))
    time.sleep(4.5)
    for study, trial in studies:
        optuna.storages.fail_stale_trials(study)
        assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING]
        assert study.trials[1].params == trial.params
