"""An RDB study storage that waits out a server outage instead of failing the sweep.

A database restart (maintenance, a failover, `pg_ctl restart`) must not crash the workers or lose the trials
they finish meanwhile: every storage call retries while the server is unreachable, for up to `patience`
seconds, and says so in one line ("storage unreachable (...), retrying in 1 s"). Errors that are not about
reaching the server (a finished trial updated again, bad data) are raised at once.

The heartbeat thread does not wait (`attempt`): a missed beat is simply sent again at the next interval, with
a fresh time stamp. `reachable_since` is when the last outage this process saw ended: a trial's heartbeat
is judged stale only against time the storage could be reached (`search.storage.recover`), so that a live
trial whose beats could not land during the outage is never failed right after it.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time

from optuna.storages import BaseStorage
from sqlalchemy import exc as sa_exc

from blocks import ConfigError

_UNREACHABLE = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.PendingRollbackError)
_BACKGROUND = re.compile(r"\s*\(Background on this error at: [^)]*\)")


class _NoFallbackLog(logging.Filter):
    """Optuna logs a dropped connection while it reads trials as a SQL dump and "Falling back to a slower
    alternative" (its fallback for too many query variables); the outage is said in our own line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Caught an error from sqlalchemy")


_NO_FALLBACK_LOG = _NoFallbackLog()


def unreachable(err: BaseException) -> str | None:
    """The first line of the server error behind `err` (Optuna wraps SQLAlchemy's, which wraps the driver's)
    when it says the server cannot be reached; None for any other error."""
    seen = err
    while seen is not None:
        if isinstance(seen, _UNREACHABLE) or getattr(seen, "connection_invalidated", False):
            text = _BACKGROUND.sub("", str(getattr(seen, "orig", None) or seen)).strip()
            return text.splitlines()[0] if text else type(seen).__name__
        seen = seen.__cause__ or seen.__context__
    return None


class PatientStorage(BaseStorage):
    """Forwards every BaseStorage call to `inner` (an RDBStorage), retrying every `retry_every` s while the
    server is unreachable; after `patience` s of outage the call raises ConfigError."""

    def __init__(self, inner: BaseStorage, url: str, patience: float = 600.0, retry_every: float = 1.0,
                 say_every: float = 30.0):
        self.inner, self.url = inner, url
        self.patience, self.retry_every, self.say_every = patience, retry_every, say_every
        self.reachable_since = 0.0  # time.time() at the end of the last outage seen; 0: none seen
        self._down_since: float | None = None
        self._said = 0.0
        self._lock = threading.Lock()
        logging.getLogger("optuna.storages._rdb.storage").addFilter(_NO_FALLBACK_LOG)

    def call(self, name: str, *args, **kwargs):
        while True:
            try:
                result = getattr(self.inner, name)(*args, **kwargs)
            except Exception as err:
                reason = unreachable(err)
                if reason is None:
                    raise
                self._down(reason)
                time.sleep(self.retry_every)
                continue
            self._up()
            return result

    def attempt(self, name: str, *args, **kwargs) -> bool:
        """One try without waiting: False (the outage noted) when the server is unreachable."""
        try:
            getattr(self.inner, name)(*args, **kwargs)
        except Exception as err:
            if (reason := unreachable(err)) is None:
                raise
            self._down(reason, wait=False)
            return False
        self._up()
        return True

    def _down(self, reason: str, wait: bool = True) -> None:
        now = time.time()
        with self._lock:
            if self._down_since is None:
                self._down_since, self._said = now, 0.0
            waited = now - self._down_since
            if wait and waited > self.patience:
                raise ConfigError(f"study storage {self.url} unreachable for {waited:.0f} s (patience "
                                  f"{self.patience:g} s): {reason}")
            if wait and now - self._said >= self.say_every:
                self._said = now
                print(f"hybrids: storage unreachable ({reason}), retrying in {self.retry_every:g} s",
                      file=sys.stderr, flush=True)

    def _up(self) -> None:
        if self._down_since is None:
            return
        with self._lock:
            if self._down_since is None:
                return
            now = time.time()
            if self._said:
                print(f"hybrids: storage reachable again after {now - self._down_since:.0f} s", file=sys.stderr,
                      flush=True)
            self._down_since, self.reachable_since = None, now


def _forward(name: str):
    def method(self, *args, **kwargs):
        return self.call(name, *args, **kwargs)

    method.__name__ = method.__qualname__ = name
    return method


for _name in BaseStorage.__abstractmethods__:
    setattr(PatientStorage, _name, _forward(_name))
PatientStorage.__abstractmethods__ = frozenset()


def reachable_since(storage: BaseStorage) -> float:
    """When the storage was last reached again after an outage (0.0: no outage seen, or not an RDB)."""
    return getattr(storage, "reachable_since", 0.0)

