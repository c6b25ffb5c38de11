"""`stop_after=SECONDS`: a sweep that ends on time without killing trials (a machine lent for a while, a job slot).

A worker starts a queued trial only if it is expected to end before the deadline: expected = the longest wall time of
the study's finished (COMPLETE) trials at the same point apart from learning rate, weight decay and seed, which do
not change a trial's length; for a trial like no finished one, the longest finished trial of the study (while the
study has none, any trial starts while time is left). The longest, not the median: the same trial runs slower when
more processes share its GPU, and a trial stopped at the deadline loses all its time. Trials already running are
not stopped; a worker that finds nothing that fits stops.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import optuna
from optuna.trial import TrialState

from search.protocol import LR, SEED, WD
from search.storage import grid_point


def _shape(point: dict) -> tuple:
    """A grid point without what leaves a trial's length unchanged."""
    return tuple(sorted((k, str(v)) for k, v in point.items() if k not in (LR, WD, SEED)))


def expected_seconds(study: optuna.Study) -> dict[tuple, float]:
    """The longest wall seconds of the COMPLETE trials, per grid point without lr, weight decay and seed."""
    seconds: dict[tuple, list[float]] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.datetime_start is not None and t.datetime_complete is not None:
            took = (t.datetime_complete - t.datetime_start).total_seconds()
            seconds.setdefault(_shape(grid_point(t)), []).append(took)
    return {shape: max(s) for shape, s in seconds.items()}


def fits_before(study: optuna.Study, deadline: float | None) -> Callable[[optuna.trial.FrozenTrial], bool]:
    """Whether a queued trial may start now: always without a deadline; else if its expected time (see the module)
    ends before `deadline` (seconds since the epoch)."""
    if deadline is None:
        return lambda trial: True
    left = deadline - time.time()
    expected = expected_seconds(study) if left > 0 else {}
    unknown = max(expected.values(), default=0.0)
    return lambda trial: left > 0 and expected.get(_shape(grid_point(trial)), unknown) <= left
