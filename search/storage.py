"""Storage that loses nothing: SQLite for one worker, a journal file or an RDB URL for several.

Trials keep their own heartbeat (a thread stamps the running trial every `interval` seconds; see `recover`
for why not Optuna's). A RUNNING trial whose stamp is older than the grace period belonged to a worker
that died (SIGKILL, power loss): `recover`, which every worker runs before it claims a trial, marks it
failed and queues a retry with its parameters, which resumes from the failed trial's checkpoint. RDB
storages wait out a server outage (search.patience).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from blocks import ConfigError
from search.patience import PatientStorage, reachable_since

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
        return PatientStorage(optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True}), shown(url))
    except ImportError:  # SQLAlchemy imports the URL's driver only now (Optuna rewords the error)
        scheme = url.partition(":")[0]
        install = ("pip install 'hybrids[postgres]' (psycopg 3, the default driver of postgresql:// URLs from "
                   "SQLAlchemy 2.1)") if scheme.startswith("postgres") else \
            f"pip install the SQLAlchemy driver for {scheme}"
        raise ConfigError(f"cannot open study storage {shown(url)!r}: no database driver for {scheme} is installed; "
                          f"{install}") from None
    except Exception as err:  # SQLAlchemy / driver errors: unreachable server, bad URL
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"cannot open study storage {shown(url)!r}: {first}") from None


def shown(url: str) -> str:
    """The URL as messages show it: an RDB URL's password as ***."""
    if url.startswith(("journal:", "sqlite:")):
        return url
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can read: the open fails and says so
        return url


class Heartbeat:
    """Context manager stamping a trial's system attr `heartbeat` with time.time() every `interval` s.

    A beat that cannot reach the storage is sent again at the next interval with a new stamp (an RDB
    storage does not wait here: search.patience); the thread ends once the trial is finished."""

    def __init__(self, trial: optuna.Trial, interval: float):
        self.storage, self.trial_id, self.interval = trial.storage, trial._trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while True:
            try:
                if isinstance(self.storage, PatientStorage):
                    self.storage.attempt("set_trial_system_attr", self.trial_id, HEARTBEAT, time.time())
                else:
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


def grid_point(trial: optuna.trial.FrozenTrial) -> dict:
    """The parameters a trial runs at: those it suggested, or (not started yet, or failed before it suggested them)
    the point it was queued with."""
    return trial.params or trial.system_attrs.get("fixed_params", {})


def origin(study: optuna.Study, trial: optuna.trial.FrozenTrial | optuna.Trial) -> int:
    """The number of the first trial in a chain of retries (whose run directory all retries share)."""
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    number = trial.number
    while RETRY_OF in by_number[number].user_attrs:
        number = by_number[number].user_attrs[RETRY_OF]
    return number


def _depth(by_number: dict[int, optuna.trial.FrozenTrial], number: int) -> int:
    """How many retries precede trial `number` in its chain (0 for a first attempt)."""
    depth = 0
    while RETRY_OF in by_number[number].user_attrs:
        number, depth = by_number[number].user_attrs[RETRY_OF], depth + 1
    return depth


def retry(study: optuna.Study, number: int, max_retry: int) -> bool:
    """Queue a retry of failed trial `number` with its parameters, unless it may not be retried (`no_retry`:
    a diverged run diverges again) or its chain already has `max_retry` retries. Returns whether it queued.

    Only the caller that failed the trial may call this: that is what makes a retry unique (see `recover`).
    """
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    trial = by_number[number]
    if trial.user_attrs.get("no_retry") or _depth(by_number, number) >= max_retry:
        return False
    study.enqueue_trial(grid_point(trial), user_attrs={RETRY_OF: number}, skip_if_exists=False)
    return True


def recover(study: optuna.Study, grace_period: float, max_retry: int) -> dict[str, list[int]]:
    """Fail stale RUNNING trials and queue one retry of each trial that this call failed.

    Every worker runs this before it claims a trial, so two workers may find the same stale trial at
    once. The RUNNING -> FAIL change is what decides who retries it: the storage applies it once (an RDB
    locks the trial's row; a journal applies its log in order) and raises UpdateFinishedTrialError to
    every later caller, so exactly one caller queues the retry, without a lock of our own. A worker that
    records its own trial as failed (SIGTERM, an error) queues that retry itself, by the same rule.
    (Optuna's `fail_stale_trials` decides the same way; its heartbeat and RetryFailedTrialCallback are not
    used because the journal storage has no heartbeat, Optuna beats only inside `Study.optimize`, which
    our claim-a-queued-trial workers do not use, and its callback retries stale trials only.)

    A heartbeat is judged against time the storage could be reached: after an outage, trials get one
    grace period for their beats to land again (search.patience).

    Returns:
        {"stale": trial numbers marked failed, "requeued": trial numbers queued again}.
    """
    now = time.time()
    since = reachable_since(study._storage)
    stale, requeued = [], []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        stamp = t.system_attrs.get(HEARTBEAT, t.datetime_start.timestamp() if t.datetime_start else now)
        if now - max(stamp, since) <= grace_period:
            continue
        try:
            study._storage.set_trial_user_attr(t._trial_id, "fail_reason", "worker stopped beating (killed?)")
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue  # another worker failed (or the owner finished) it first: theirs to retry
        stale.append(t.number)
        if retry(study, t.number, max_retry):
            requeued.append(t.number)
    return {"stale": stale, "requeued": requeued}


def requeue_orphans(study: optuna.Study, grace_period: float, max_retry: int) -> list[int]:
    """Queue the retry that a failed trial's own worker never queued (it was SIGKILLed between recording the
    failure and queuing the retry): a FAIL older than the grace period, with no retry of its own and no other
    trial at its parameters that is finished, running or queued. Run once by a sweep command before its
    workers start (like `search.runner._queue`), so no two callers race for one orphan on one machine.
    Returns the trial numbers retried."""
    now = time.time()
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs[RETRY_OF] for t in trials if RETRY_OF in t.user_attrs}
    live = [grid_point(t) for t in trials if t.state != TrialState.FAIL]
    out = []
    for t in trials:
        if t.state != TrialState.FAIL or t.number in retried or t.datetime_complete is None:
            continue
        if now - t.datetime_complete.timestamp() <= grace_period:
            continue  # its worker may be queuing the retry right now
        if grid_point(t) in live:
            continue
        if retry(study, t.number, max_retry):
            out.append(t.number)
    return out


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
