"""One run, one folder, found again wherever it is: the installed `convmixer` refuses a second run on a folder that
holds one (unless --overwrite) and two fits at once, resumes moved and copied runs into their own files, says a
finished run has nothing left to do, and never evaluates another run's weights."""

from __future__ import annotations

import fcntl
import shutil

import torch
from conftest import TINY_DIGITS

QUIET = ["--trainer.enable_model_summary", "false", "--plots.enabled", "false", "--report.enabled", "false",
         "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2"]


def fit(convmixer, cwd, *extra: str, epochs: int = 1):
    return convmixer("fit", *TINY_DIGITS, *QUIET, "--name", "run", "--trainer.max_epochs", str(epochs), *extra,
                     cwd=cwd)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


def test_a_second_fit_under_a_name_that_has_a_run_stops_unless_overwrite(convmixer, tmp_path):
    first = fit(convmixer, tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    folder = tmp_path / "checkpoints" / "run"
    before = {path.name: path.read_bytes() for path in folder.glob("*.ckpt")}

    again = fit(convmixer, tmp_path, "--model.dim", "24")
    assert again.returncode == 2 and "Traceback" not in again.stderr
    errors = error_lines(again.stderr)
    assert len(errors) == 1 and "checkpoints/run/ already holds a run" in errors[0], again.stderr
    assert "--ckpt_path last" in errors[0] and "--name" in errors[0] and "--overwrite true" in errors[0]
    assert {path.name: path.read_bytes() for path in folder.glob("*.ckpt")} == before  # nothing lost

    # --overwrite starts over, and evaluation then uses the new run: a 24-wide model, not the first run's 16
    new = fit(convmixer, tmp_path, "--model.dim", "24", "--overwrite", "true")
    assert new.returncode == 0, new.stderr[-2000:]
    assert sorted(path.name for path in folder.glob("*.ckpt")) == ["epoch000.ckpt", "last.ckpt"]  # no -v1 files
    for ckpt in folder.glob("*.ckpt"):
        state = torch.load(ckpt, weights_only=True)
        assert state["hyper_parameters"]["dim"] == 24
        assert state["speed"]["precision"] == "32-true"  # what a resumed run trains with again
    tested = convmixer("test", *TINY_DIGITS, *QUIET, "--name", "run", cwd=tmp_path)
    assert tested.returncode == 0, tested.stderr[-2000:]
    assert "test uses checkpoints/run/epoch000.ckpt" in tested.stderr
    assert "was trained: dim 24 (not 16)" in tested.stderr  # the flags say 16; the new run's 24-wide model is tested


def test_two_fits_on_one_folder_at_once_are_refused(convmixer, tmp_path):
    folder = tmp_path / "checkpoints" / "run"
    folder.mkdir(parents=True)
    with open(folder / ".convmixer.lock", "a+") as held:  # what a running fit holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 12345")
        held.flush()
        second = fit(convmixer, tmp_path)
    assert second.returncode == 2
    errors = error_lines(second.stderr)
    assert len(errors) == 1 and "is being written by another `convmixer fit` (pid 12345)" in errors[0], second.stderr
    assert not list(folder.glob("*.ckpt"))
    after = fit(convmixer, tmp_path)  # the lock went with its holder
    assert after.returncode == 0, after.stderr[-2000:]


def test_moved_and_copied_runs_resume_and_evaluate_their_own_files(convmixer, tmp_path):
    original = tmp_path / "project"
    original.mkdir()
    assert fit(convmixer, original).returncode == 0
    moved, copy = tmp_path / "renamed", tmp_path / "copy"
    original.rename(moved)
    shutil.copytree(moved, copy)

    resumed = fit(convmixer, moved, "--ckpt_path", "last", epochs=2)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    folder = moved / "checkpoints" / "run"
    assert not list(folder.glob("*-v1.ckpt")), sorted(p.name for p in folder.iterdir())
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 6  # rewritten in place
    assert "dirpath has changed" not in resumed.stderr

    shutil.rmtree(moved)  # the copy reads only its own files
    tested = convmixer("test", *TINY_DIGITS, *QUIET, "--name", "run", cwd=copy)
    assert tested.returncode == 0, tested.stderr[-2000:]
    assert "test uses checkpoints/run/epoch000.ckpt" in tested.stderr


def test_resuming_a_finished_run_says_there_is_nothing_left_and_a_longer_one_says_what_the_schedule_does(
        convmixer, tmp_path):
    assert fit(convmixer, tmp_path).returncode == 0
    finished = fit(convmixer, tmp_path, "--ckpt_path", "last")
    assert finished.returncode == 0 and "Traceback" not in finished.stderr, finished.stderr[-2000:]
    assert "has trained 1 epoch(s), trainer.max_epochs is 1: nothing left to train" in finished.stderr

    longer = fit(convmixer, tmp_path, "--ckpt_path", "last", epochs=2)
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert "the onecycle schedule now spans 6 steps (was 3): at the resumed step 3" in longer.stderr
    logs = sorted((tmp_path / "checkpoints" / "run" / "lightning_logs").iterdir())
    assert [log.name for log in logs] == ["version_0"]  # the resumed run continued its log
