"""Where a study lives: Optuna's database storage (SQLite by default, PostgreSQL, MySQL) or its journal file, both
with heartbeats, so that a dead worker's trial is failed and queued again; and the study, checked and opened."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.distributions import BaseDistribution
from optuna.storages._heartbeat import BaseHeartbeat  # the interface Optuna's heartbeat machinery calls
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from .options import FINISHED, SweepError

GRACE_BEATS = 3  # a running trial without a heartbeat for this many intervals is failed and queued again
MAX_RETRY = 3  # times one trial is queued again


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage (a file several machines append to) with the heartbeats its database storage has:
    Optuna then fails the trials of a dead worker and queues them again, as for a database. A heartbeat is the
    writer's clock, so the machines' clocks must agree to within the grace period (NTP does)."""

    def __init__(self, path: str, heartbeat_interval: int, stale_trial_callback: Callable) -> None:
        super().__init__(JournalFileBackend(path))
        self._heartbeat_interval = heartbeat_interval
        self._stale_trial_callback = stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, "heartbeat", time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        return [trial._trial_id for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
                if now - _last_sign_of_life(trial) > GRACE_BEATS * self._heartbeat_interval]

    def get_heartbeat_interval(self) -> int | None:
        return self._heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable | None:
        return self._stale_trial_callback


def _last_sign_of_life(trial: FrozenTrial) -> float:
    """When the trial last beat, or started (a re-queued trial carries the heartbeat of the one it replaces)."""
    started = trial.datetime_start.timestamp() if trial.datetime_start else time.time()
    return max(started, float(trial.system_attrs.get("heartbeat", 0.0)))


def open_storage(storage: str | None, out_dir: Path, heartbeat_interval: int) -> optuna.storages.BaseStorage:
    """The study's storage (default: SQLite in `out_dir`), with heartbeats; one line if it cannot be opened."""
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
    url = storage or f"sqlite:///{(out_dir / 'sweep.db').resolve()}"
    if storage is None:
        _make_folder(out_dir, "out_dir")
    journal = Path(url.removeprefix("journal:")) if url.startswith("journal:") or url.endswith(".log") else None
    if journal:
        _make_folder(journal.parent, f"storage {url}")
    try:
        if journal:
            return HeartbeatJournalStorage(str(journal), heartbeat_interval, retry)
        return _open_database(url, heartbeat_interval, retry)
    except Exception as err:  # sqlalchemy's and the drivers' errors, a missing driver module, a bad path
        raise SweepError(f"storage {hide_password(url)}: cannot open it ({first_line(err)}); give a URL Optuna "
                         "can reach, e.g. sqlite:///sweep.db, postgresql://user@host/db or journal:/shared/sweep.log"
                         ) from None


def _open_database(url: str, heartbeat_interval: int, retry: Callable) -> optuna.storages.RDBStorage:
    """Optuna's database storage; of workers racing to create a new database's tables, the loser opens it again."""
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}  # wait for locks
    for attempt in range(3):  # returns or raises
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                                              grace_period=GRACE_BEATS * heartbeat_interval,
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


def hide_password(url: str) -> str:
    """The URL as messages show it: a database password as ***."""
    try:
        import sqlalchemy

        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a database URL (a journal path): nothing to hide
        return url


def first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def check_existing_study(storage, shown: str, name: str, direction: str,
                         distributions: dict[str, BaseDistribution]) -> int:
    """The number of finished trials of the study of this name, if any. One made to optimise the other way, or with
    another kind of range for an option (Optuna would fail every trial), is refused in one line."""
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:  # no such study yet
        return 0
    except Exception as err:
        raise SweepError(f"storage {shown}: cannot read it ({first_line(err)})") from None
    if study.direction.name.lower() != direction:
        raise SweepError(f"direction {direction}: study {name} in {shown} was made to "
                         f"{study.direction.name.lower()}; keep that, or give a new study_name")
    trials = study.get_trials(deepcopy=False)
    earlier = {key: distribution for trial in trials for key, distribution in trial.distributions.items()}
    for key, distribution in distributions.items():
        try:
            if key in earlier:
                optuna.distributions.check_distribution_compatibility(earlier[key], distribution)
        except ValueError as err:
            raise SweepError(f"space.{key}: does not fit the earlier trials of study {name} ({first_line(err)}); "
                             "keep its kind of range, or give a new study_name") from None
    return sum(trial.state in FINISHED for trial in trials)


def open_study(storage, shown: str, name: str, direction: str, sampler, pruner) -> optuna.Study:
    """The study, new or continued, written to once (the time this worker joined) so that a storage that cannot
    be written is found before any trial."""
    try:
        study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner,
                                    direction=direction, load_if_exists=True)
        study.set_user_attr("last_worker_start", time.strftime("%Y-%m-%d %H:%M:%S %z"))
        return study
    except Exception as err:
        raise SweepError(f"storage {shown}: cannot write study {name} ({first_line(err)}); "
                         "give a storage you can write to") from None
