"""`run_study`: create or load a study, recover what earlier runs left, top it up to its target.

Running the same command again tops the study up to `n_trials` finished (complete + pruned) trials
instead of adding n more. `workers=N` starts N local worker processes on a shared journal or RDB
storage; another machine joins by running the same command with the same storage URL.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import time
from dataclasses import asdict

import optuna
from optuna.trial import TrialState

from blocks import ConfigError
from search.checks import check_study
from search.identity import StudyIdentity, resolve
from search.objective import Objective, TrialInterrupted
from search.storage import counts, grid_point, open_storage, recover, requeue_orphans, still_running
from search.study_config import StudyConfig, load_study
from search.worker import open_study, quiet, work, worker_main


def _protocol_attrs(config: StudyConfig, identity: StudyIdentity, extra_train: list[str]) -> dict:
    """What the report needs to judge the comparison: arms, grids and the reference's budget."""
    attrs = {"arm_by": config.arm_by(), "lr_grid": config.lr_grid, "wd_grid": config.wd_grid,
             "match_by": None, "match_budget": None}
    if config.matching is not None:
        target, _ = Objective(config, identity, extra_train, None).match_target
        attrs.update(match_by=config.matching.by, match_budget=target)
    return attrs


def _parent_run(config: StudyConfig, identity: StudyIdentity, study: optuna.Study) -> str | None:
    """The study's MLflow parent run in this tracking store (created once, reused by every top-up), or None
    without tracking."""
    if not config.tracked:
        return None
    run_id = study.user_attrs.get("mlflow_parent_run_id")
    if run_id and study.user_attrs.get("mlflow_parent_tracking_uri", config.tracking_uri) == config.tracking_uri:
        return run_id
    from mlflow import MlflowClient

    from hybrids.training.tracking import STORAGE_TAG, ensure_store, experiment_id, record_tags

    ensure_store(config.tracking_uri)
    client = MlflowClient(tracking_uri=config.tracking_uri)
    exp = experiment_id(client, f"study-{config.name}", config.artifacts)
    run = client.create_run(exp, run_name=f"study {identity.name} ({identity.uid})",
                            tags={"hybrids.study": config.name, "hybrids.study_uid": identity.uid,
                                  "hybrids.study_version": str(identity.version),
                                  STORAGE_TAG: config.resolved_storage(), **record_tags()})
    for key, value in {"metric": config.metric, "direction": config.direction, "sampler": config.sampler,
                       "n_trials": config.n_trials, "space": ", ".join(config.space), "kind": config.kind}.items():
        client.log_param(run.info.run_id, key, value)
    study.set_user_attr("mlflow_parent_run_id", run.info.run_id)
    study.set_user_attr("mlflow_parent_tracking_uri", config.tracking_uri)
    return run.info.run_id


def _queue(config: StudyConfig, study: optuna.Study) -> int:
    """Queue every trial the study still needs, before any worker starts: the grid points that no trial
    covers yet, or (other samplers) empty trials that the sampler fills in when a worker claims them, up to
    `n_trials` trials that are finished, running or queued. Failed trials are re-queued by whoever failed
    them (search.storage.recover)."""
    trials = study.get_trials(deepcopy=False)
    if config.sampler == "grid":
        covered = [grid_point(t) for t in trials]
        points = [point for point in config.grid()[: config.n_trials] if point not in covered]
    else:
        live = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
                   for t in trials)
        points = [{}] * max(0, config.n_trials - live)
    for point in points:
        study.enqueue_trial(point)
    return len(points)


def run_study(config: StudyConfig | list[str], extra_train: list[str] | None = None) -> dict:
    """Recover, queue and run the study's remaining trials (`hybrids.run_study`).

    Args:
        config: a StudyConfig, or `hybrids sweep` arguments: ["study=attention-spacing", "n_trials=2",
            "train.trainer.max_steps=20"] (study keys, and train.<override> for every trial).
        extra_train: Hydra training overrides added to every trial's (after those of the list form).
    Returns:
        {"counts": trial counts by state and "done", "recovered": what recovery did, "queued": trials
        queued, "storage": the storage URL, "study": the StudyIdentity (search.identity) it ran}.
    Raises:
        ConfigError: an unknown study or key, bad storage for several workers, unreachable storage.
        TrialInterrupted: Ctrl-C / SIGTERM during a trial (that trial is recorded as failed).
    """
    if isinstance(config, str):
        raise ConfigError(f"run_study takes a StudyConfig or a list of key=value overrides, got the string {config!r}")
    if not isinstance(config, StudyConfig):
        config, listed = load_study(list(config))
        extra_train = [*listed, *(extra_train or [])]
    extra_train = list(extra_train or [])
    check_study(config, extra_train)
    url = config.resolved_storage()
    if config.workers > 1 and url.startswith("sqlite"):
        raise ConfigError("several workers need a journal file or an RDB storage "
                          "(storage=journal:runs/optuna.journal or a postgresql:// URL), not SQLite")
    quiet()
    storage = open_storage(url)
    _, identity, note = resolve(storage, config, extra_train)
    if note:
        print(note, flush=True)
    study = open_study(config, identity, storage)
    for key, value in {"metric": config.metric, "direction": config.direction, "question": config.question,
                       "group_by": config.group_by(), "x": config.x, "kind": config.kind,
                       "tracking_uri": config.tracking_uri, "n_trials": config.n_trials,
                       **_protocol_attrs(config, identity, extra_train)}.items():
        study.set_user_attr(key, value)
    parent = _parent_run(config, identity, study)
    _parent_status(config, parent, "RUNNING")  # a top-up re-opens the run a finished or killed sweep closed
    try:
        recovered = recover(study, config.grace_period, config.max_retry)
        recovered["requeued"] += requeue_orphans(study, config.grace_period, config.max_retry)
        for number, left in still_running(study, config.grace_period):
            print(f"trial {number} is still RUNNING (its worker beat within grace_period = {config.grace_period:g} "
                  f"s): left to that worker; if the worker is gone, the trial counts as stale and is retried by a "
                  f"run started in {left:.0f} s or later", flush=True)
        queued = _queue(config, study)
        sweep = f"{socket.gethostname()}:{os.getpid()}:{time.time():.0f}"  # this command's workers' trials
        if config.workers == 1 or counts(study)["done"] >= config.n_trials:  # done: no worker to start
            work(config, identity, extra_train, parent, sweep)
            exitcodes = [0]
        else:
            exitcodes = _run_workers(config, identity, extra_train, parent, sweep)
    except (KeyboardInterrupt, TrialInterrupted):
        _close_parent(config, study, parent, "KILLED")
        raise
    except Exception:
        _close_parent(config, study, parent, "FAILED")
        raise
    final = counts(study)
    status = _final_status(exitcodes)
    _close_parent(config, study, parent, status)
    return {"counts": final, "recovered": recovered, "queued": queued, "storage": url, "study": identity,
            "status": status}


def _run_workers(config: StudyConfig, identity: StudyIdentity, extra_train: list[str], parent: str,
                 sweep: str) -> list[int]:
    """Start `config.workers` local worker processes and wait for them; returns their exit codes."""
    ctx = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // config.workers)
    procs = [ctx.Process(target=worker_main, args=(asdict(config), identity, extra_train, parent, threads, sweep, i))
             for i in range(config.workers)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()  # SIGTERM: each worker records its running trial as failed
        for p in procs:
            p.join()
        raise TrialInterrupted("sweep interrupted") from None
    return [p.exitcode for p in procs]


def _final_status(exitcodes: list[int]) -> str:
    """FINISHED once the workers stopped cleanly (target reached or grid exhausted); KILLED when a worker
    was interrupted (exit 130) or killed by a signal; FAILED when one died of an error."""
    if all(code == 0 for code in exitcodes):
        return "FINISHED"
    if any(code == 130 or code < 0 for code in exitcodes):
        return "KILLED"
    return "FAILED"


def _parent_status(config: StudyConfig, run_id: str | None, status: str) -> None:
    if run_id is None:
        return
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=config.tracking_uri).update_run(run_id, status=status)


def _close_parent(config: StudyConfig, study: optuna.Study, run_id: str | None, status: str) -> None:
    """Log the study's best value and progress to its parent run `run_id` (None without tracking: nothing to
    close) and close it as `status`.

    Called on the way out of an interrupted or failed sweep too: a failure here is logged, never raised
    over the error that ended the sweep.
    """
    if run_id is None:
        return
    from mlflow import MlflowClient

    try:
        client = MlflowClient(tracking_uri=config.tracking_uri)
        complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
        if complete:
            client.log_metric(run_id, f"best/{config.metric}", study.best_value)
        client.log_metric(run_id, "trials_done", counts(study)["done"])
        client.set_terminated(run_id, status)
    except Exception as err:  # the store went away mid-sweep: the trials themselves are safe in the study
        logging.getLogger("hybrids").warning("could not close the study's MLflow run as %s: %s", status, err)
