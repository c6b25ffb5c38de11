"""Storage that loses nothing: SQLite for one worker, a journal file or an RDB URL for several.

Optuna's own heartbeat exists only for RDB storages, so trials here keep their own: a thread stamps
the running trial every `interval` seconds. A RUNNING trial whose stamp is older than the grace period
belonged to a worker that died (SIGKILL, power loss): `recover` marks it failed, and failed trials
are re-queued with their parameters, so that the retry resumes from the failed trial's checkpoint.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from blocks import ConfigError

HEARTBEAT = "heartbeat"
RETRY_OF = "retry_of"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for a URL: sqlite:///path, journal:path, or any SQLAlchemy RDB URL.

    Raises:
        ConfigError: when the storage cannot be opened.
    """
    try:
        if url.startswith("journal:"):
            path = Path(url.removeprefix("journal:"))
            path.parent.mkdir(parents=True, exist_ok=True)
            backend = optuna.storages.journal.JournalFileBackend(str(path))
            return optuna.storages.JournalStorage(backend)
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    except ImportError:  # SQLAlchemy imports the URL's driver only now (Optuna rewords the error)
        scheme = url.partition(":")[0]
        install = ("pip install 'hybrids[postgres]' (psycopg 3, the default driver of postgresql:// URLs from "
                   "SQLAlchemy 2.1)") if scheme.startswith("postgres") else \
            f"pip install the SQLAlchemy driver for {scheme}"
        raise ConfigError(f"cannot open study storage {url!r}: no database driver for {scheme} is installed; "
                          f"{install}") from None
    except Exception as err:  # SQLAlchemy / driver errors: unreachable server, bad URL
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"cannot open study storage {url!r}: {first}") from None


class Heartbeat:
    """Context manager stamping a trial's system attr `heartbeat` with time.time() every `interval` s."""

    def __init__(self, trial: optuna.Trial, interval: float):
        self.storage, self.trial_id, self.interval = trial.storage, trial._trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while True:
            try:
                self.storage.set_trial_system_attr(self.trial_id, HEARTBEAT, time.time())
            except Exception:  # the trial finished meanwhile (attrs are frozen): nothing left to stamp
                return
            if self._stop.wait(self.interval):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def origin(study: optuna.Study, trial: optuna.trial.FrozenTrial | optuna.Trial) -> int:
    """The number of the first trial in a chain of retries (whose run directory all retries share)."""
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    number = trial.number
    while RETRY_OF in by_number[number].user_attrs:
        number = by_number[number].user_attrs[RETRY_OF]
    return number


def recover(study: optuna.Study, grace_period: float, max_retry: int) -> dict[str, list[int]]:
    """Fail stale RUNNING trials, then re-queue failed trials that have no retry yet.

    Returns:
        {"stale": trial numbers marked failed, "requeued": trial numbers queued again}.
    """
    now = time.time()
    trials = study.get_trials(deepcopy=False)
    stale = []
    for t in trials:
        if t.state != TrialState.RUNNING:
            continue
        stamp = t.system_attrs.get(HEARTBEAT, t.datetime_start.timestamp() if t.datetime_start else now)
        if now - stamp > grace_period:
            study._storage.set_trial_user_attr(t._trial_id, "fail_reason", "worker stopped beating (killed?)")
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            stale.append(t.number)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs[RETRY_OF] for t in trials if RETRY_OF in t.user_attrs}
    depth = {}
    for t in trials:
        depth[t.number] = depth.get(t.user_attrs[RETRY_OF], 0) + 1 if RETRY_OF in t.user_attrs else 0
    requeued = []
    for t in trials:
        if t.state == TrialState.FAIL and t.number not in retried and depth[t.number] < max_retry \
                and not t.user_attrs.get("no_retry"):
            study.enqueue_trial(t.params, user_attrs={RETRY_OF: t.number}, skip_if_exists=False)
            requeued.append(t.number)
    return {"stale": stale, "requeued": requeued}


def still_running(study: optuna.Study, grace_period: float) -> list[tuple[int, float]]:
    """RUNNING trials whose worker still beats: (trial number, seconds until it counts as stale)."""
    now = time.time()
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        stamp = t.system_attrs.get(HEARTBEAT, t.datetime_start.timestamp() if t.datetime_start else now)
        out.append((t.number, max(0.0, grace_period - (now - stamp))))
    return out


def counts(study: optuna.Study) -> dict[str, int]:
    """Trials by state; "done" = complete + pruned (what a top-up counts toward the target)."""
    out = {s.name.lower(): 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name.lower()] += 1
    out["done"] = out["complete"] + out["pruned"]
    return out
