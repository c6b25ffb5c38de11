"""A sweep worker: recover, claim a queued trial, run it; until the study is done.

`run_study` queues every trial the study still needs before any worker starts (grid points, or empty
trials the sampler fills in), so a worker only ever claims a WAITING trial. Claiming is one atomic state
change in the storage: two workers never run the same trial, and no worker creates a trial beyond the
study's target. Before each claim the worker fails stale trials and queues their retries
(`search.storage.recover`); with nothing left to claim it waits while a trial of its own sweep still runs,
since that trial's worker may die and leave a retry to take.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import math
import os
import secrets
import signal
import socket
import sys
import time
import warnings

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from blocks import ConfigError
from hybrids.training.progress import format_duration
from search.deadline import fits_before
from search.identity import StudyIdentity
from search.objective import Objective, TrialInterrupted
from search.protocol import ArmMedianPruner
from search.storage import counts, open_storage, recover, retry
from search.study_config import StudyConfig

SWEEP, WORKER, SAMPLER_SEED = "sweep", "worker", "sampler_seed"  # user attrs: who ran a trial, with what seed


def sampler_seed() -> int:
    """A fresh seed for one worker's sampler: workers of one sweep, of a top-up or of another machine
    never propose the same sequence of points. Each trial records the seed of the worker that ran it."""
    return secrets.randbits(31)


def _sampler(config: StudyConfig, seed: int):
    if config.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)  # grid points are queued up front; random fills nothing


def _pruner(config: StudyConfig):
    """None, or the median rule: within an arm when arms train over a learning-rate (or weight-decay) grid, so
    that a weak arm is measured, not pruned, and only an arm's clearly worse learning rates are cut short."""
    if config.pruner == "none":
        return optuna.pruners.NopPruner()
    if config.lr_grid or config.wd_grid:
        return ArmMedianPruner(config.arm_by(), config.direction == "maximize", n_startup_trials=2)
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)


def open_study(config: StudyConfig, identity: StudyIdentity, storage, seed: int = 0) -> optuna.Study:
    return optuna.load_study(study_name=identity.name, storage=storage, sampler=_sampler(config, seed),
                             pruner=_pruner(config))


def claim(study: optuna.Study, storage: optuna.storages.BaseStorage, target: int,
          fits=lambda trial: True) -> optuna.Trial | None:
    """The next queued trial that `fits` (search.deadline), now RUNNING and this worker's; None once the study
    has `target` finished trials or nothing that fits is queued. The WAITING -> RUNNING change fails for all but
    one claimant."""
    if counts(study)["done"] >= target:
        return None
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if not fits(t):
            continue
        with contextlib.suppress(UpdateFinishedTrialError):
            if storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                return optuna.Trial(study, t._trial_id)
    return None


def run_trial(study: optuna.Study, trial: optuna.Trial, objective, max_retry: int) -> optuna.trial.FrozenTrial:
    """Run `objective` on a claimed trial and record its end: COMPLETE, PRUNED, or FAIL (a non-finite value,
    or an error, which is re-raised after it is recorded). A failed trial's retry is queued here, by the
    worker that failed it (search.storage.retry)."""
    try:
        value = objective(trial)
    except optuna.TrialPruned:
        return study.tell(trial, state=TrialState.PRUNED)
    except BaseException:
        study.tell(trial, state=TrialState.FAIL)
        retry(study, trial.number, max_retry)
        raise
    if value is None or not math.isfinite(value):
        frozen = study.tell(trial, state=TrialState.FAIL)
        retry(study, trial.number, max_retry)
        return frozen
    return study.tell(trial, value)


class Progress:
    """One line per finished trial: its value, seed, wall time and the study's ETA."""

    def __init__(self, target: int, workers: int = 1):
        self.target, self.workers = target, workers

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        value = f"{trial.value:.4f}" if trial.value is not None else "-"
        reason = trial.user_attrs.get("fail_reason", "")
        print(f"trial {trial.number:>3} {trial.state.name.lower():<8} {value:>8}  {trial.user_attrs.get('group', '')}"
              f"  {trial.user_attrs.get('layout', '')}  seed {trial.user_attrs.get('seed', '-')}"
              f"  {format_duration(_seconds(trial))}  {self.eta(study, counts(study))} {reason}".rstrip(), flush=True)

    def eta(self, study: optuna.Study, c: dict) -> str:
        """Remaining trials (at most those queued or running) x mean finished-trial time / local workers, in
        whole rounds of trials (the last trial takes a trial's time however many workers are idle)."""
        left = min(self.target - c["done"], c.get("waiting", 0) + c.get("running", 0))
        times = [_seconds(t) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))]
        if left <= 0 or not times:
            return f"{max(left, 0)} left"
        return f"{left} left, eta {format_duration(math.ceil(left / self.workers) * sum(times) / len(times))}"


def _seconds(trial) -> float:
    return trial.duration.total_seconds() if trial.duration is not None else float("nan")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


class _NoFailedTrialLog(logging.Filter):
    """Optuna logs a failed trial with its traceback; the CLI prints the error in one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return " failed with " not in record.getMessage() and " failed because of " not in record.getMessage()


_NO_FAILED_TRIAL_LOG = _NoFailedTrialLog()


def quiet() -> None:
    """One line per trial instead of Lightning's and MLflow's banners for every run."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import lightning.pytorch  # noqa: F401  both set their loggers to INFO when imported: import them first

    with contextlib.suppress(ImportError):  # a sweep with tracking_uri=none runs without MLflow installed
        import mlflow  # noqa: F401

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # "View run at" of a tracking server
    for name in ("lightning.pytorch", "lightning.fabric", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("optuna.study._optimize", "optuna.study.study"):
        logging.getLogger(name).addFilter(_NO_FAILED_TRIAL_LOG)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def work(config: StudyConfig, identity: StudyIdentity, extra_train: list[str], parent_run_id: str | None,
         sweep: str = "", index: int = 0) -> None:
    """One worker (number `index` of the sweep `sweep`): recover, claim and run queued trials until the study
    reaches its target, or nothing is queued and no trial of this sweep still runs."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    if (device := config.device(index)) is not None:  # before CUDA starts: this process sees one GPU, as cuda:0
        os.environ["CUDA_VISIBLE_DEVICES"] = str(device)
    quiet()
    storage = open_storage(config.resolved_storage())
    seed = sampler_seed()
    study = open_study(config, identity, storage, seed)
    name = f"{socket.gethostname()}:{os.getpid()}"
    on = f", GPU {config.device(index)}" if config.devices is not None else ""
    print(f"worker {index} ({name}{on}): sampler seed {seed}", flush=True)
    objective = Objective(config, identity, extra_train, parent_run_id)
    progress = Progress(config.n_trials, config.workers)
    deadline = None if config.stop_after is None else time.time() + config.stop_after
    while True:
        recover(study, config.grace_period, config.max_retry)
        trial = claim(study, storage, config.n_trials, fits_before(study, deadline))
        if trial is None:
            c = counts(study)
            if deadline is not None and c["waiting"] and c["done"] < config.n_trials:
                print(f"worker {index} ({name}): stops: no queued trial is expected to end within stop_after = "
                      f"{config.stop_after:g} s", flush=True)
                return
            if c["done"] >= config.n_trials or not _running_in(study, sweep):
                return
            time.sleep(config.heartbeat_interval)  # a trial of this sweep runs: its worker may yet die
            continue
        for key, value in {SWEEP: sweep, WORKER: name, SAMPLER_SEED: seed}.items():
            trial.set_user_attr(key, value)
        progress(study, run_trial(study, trial, objective, config.max_retry))
        gc.collect()


def _running_in(study: optuna.Study, sweep: str) -> bool:
    """Whether a trial claimed by a worker of sweep `sweep` is RUNNING (trials of other sweeps, such as
    another machine's, are left to them)."""
    return any(t.user_attrs.get(SWEEP) == sweep for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def worker_main(config_dict: dict, identity: StudyIdentity, extra_train: list[str], parent_run_id: str | None,
                threads: int, sweep: str, index: int) -> None:
    import torch

    torch.set_num_threads(threads)
    code = 0
    try:
        work(StudyConfig(**config_dict), identity, extra_train, parent_run_id, sweep, index)
    except TrialInterrupted:
        code = 130
    except ConfigError as err:  # a trial's config that the checks before the sweep could not see: one line
        print(f"hybrids: error: worker {index}: {err}", file=sys.stderr)
        code = 2
    # everything the worker did is in the storage: run Python's exit handlers, then skip the interpreter's native
    # teardown of torch and Lightning (seconds per process on a busy machine)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
