"""A sweep that loses nothing (issue 11): 3 workers x 12 grid trials with one worker SIGKILLed and one SIGTERMed
mid-trial, on the journal file and on PostgreSQL; and the PostgreSQL server stopped and restarted under a sweep.

PostgreSQL tests use conftest's `postgres` fixture: skipped without a server unless CI requires one.
"""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search.storage import open_storage

LRS = [round(0.001 * (i + 1), 3) for i in range(12)]
STUDY = f"""
question: does a sweep lose trials under faults?
metric: val/loss
direction: minimize
sampler: grid
pruner: none
space:
  optim.lr: {{choices: {LRS}}}
train:
  - model=mamba-tiny
  - model.depth=1
  - model.d_model=16
  - model.vocab_size=32
  - model.blocks.mamba.d_state=4
  - task.num_kv_pairs=2
  - task.seq_len=16
  - task.vocab_size=32
  - trainer.batch_size=4
  - trainer.max_steps=60
  - trainer.val_every=60
  - trainer.val_batches=1
  - trainer.ckpt_every=4
  - trainer.log_every=1
  - schedule.warmup_steps=1
"""


@pytest.fixture(params=["journal", "postgres"])
def storage(request, tmp_path):
    if request.param == "journal":
        return f"journal:{tmp_path}/optuna.journal"
    return request.getfixturevalue("postgres")


def _sweep(tmp_path, storage, *extra) -> list[str]:
    study = tmp_path / "faults.yaml"
    study.write_text(STUDY)
    return [sys.executable, "-m", "hybrids.cli", "sweep", f"study={study}", f"storage={storage}", "workers=3",
            f"runs_dir={tmp_path}/sweeps", "tracking_uri=none", "heartbeat_interval=0.5", "grace_period=3", *extra]


def _start(cmd, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _study(storage: str) -> optuna.Study | None:
    names = optuna.get_all_study_names(open_storage(storage))
    return optuna.load_study(study_name=names[0], storage=open_storage(storage)) if names else None


def _victim(storage: str, runs: Path, spared: set[int], proc, log: Path, timeout: float = 90):
    """A first-attempt trial RUNNING with a checkpoint on disk, in a worker not in `spared`: (number, worker pid)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        study = _study(storage)
        for t in study.get_trials(states=(TrialState.RUNNING,)) if study else []:
            pid = int(t.user_attrs.get("worker", ":0").rsplit(":", 1)[1])
            if pid and pid not in spared and "retry_of" not in t.user_attrs and \
                    list(runs.glob(f"*/trial-{t.number:04d}/checkpoints/last.ckpt")):
                return t.number, pid
        time.sleep(0.05)
    raise AssertionError("no running trial with a checkpoint:\n" + log.read_text()[-3000:])


def _first_step_of_last_attempt(run_dir: Path) -> int:
    """The first step the newest attempt of a run logged (csv/version_N/metrics.csv, one N per attempt)."""
    newest = max((run_dir / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    with (newest / "metrics.csv").open() as f:
        return min(int(row["step"]) for row in csv.DictReader(f) if row["step"])


def _check_nothing_lost(study: optuna.Study, killed: list[int]) -> list[optuna.trial.FrozenTrial]:
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["optim.lr"] for t in complete) == LRS  # every grid point COMPLETE, exactly once
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert sorted(t.number for t in trials if t.state == TrialState.FAIL) == sorted(killed)
    retries = [t for t in complete if "retry_of" in t.user_attrs]
    assert sorted(t.user_attrs["retry_of"] for t in retries) == sorted(killed)
    for t in retries:  # each retry resumed from its origin's checkpoint, in its origin's run folder
        origin = next(o for o in trials if o.number == t.user_attrs["retry_of"])
        assert t.params == origin.params
        assert t.user_attrs["run_dir"].endswith(f"trial-{origin.number:04d}")
        assert t.user_attrs["resumed_from"].endswith(".ckpt")
        assert _first_step_of_last_attempt(Path(t.user_attrs["run_dir"])) > 0
    return trials


def test_killed_and_terminated_workers_lose_no_trial(tmp_path, storage):
    log = tmp_path / "sweep.log"
    start = time.time()
    proc = _start(_sweep(tmp_path, storage), log)
    runs = tmp_path / "sweeps"
    killed, kill_pid = _victim(storage, runs, set(), proc, log)
    os.kill(kill_pid, signal.SIGKILL)
    termed, term_pid = _victim(storage, runs, {kill_pid}, proc, log)
    os.kill(term_pid, signal.SIGTERM)
    proc.wait(timeout=240)
    out = log.read_text()
    # the sweep finished in one command: the other workers took the SIGTERMed trial's retry at once and the
    # SIGKILLed one's once its heartbeat was older than grace_period
    assert "12/12 done (12 complete, 0 pruned, 2 failed)" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    trials = _check_nothing_lost(_study(storage), [killed, termed])
    workers = {t.user_attrs["worker"]: t.user_attrs["sampler_seed"] for t in trials if "worker" in t.user_attrs}
    assert len(workers) >= 3 and len(set(workers.values())) == len(workers)  # one sampler seed per worker
    # the same command again finds the study done: nothing is queued or run
    again = subprocess.run(_sweep(tmp_path, storage), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "12/12 done" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
    assert len(_study(storage).get_trials()) == len(trials)
    print(f"{storage.split(':')[0]}: {len(trials)} trials ({len(LRS)} grid points, 2 retries) in "
          f"{time.time() - start:.1f} s")


def test_postgres_restart_under_a_sweep_loses_nothing(tmp_path, postgres):
    ctl = os.environ.get("HYBRIDS_TEST_POSTGRES_CTL")
    if not ctl:
        pytest.skip("HYBRIDS_TEST_POSTGRES_CTL (the .ci/postgres script) is needed to stop and start the server")
    log = tmp_path / "sweep.log"
    proc = _start(_sweep(tmp_path, postgres), log)
    deadline = time.time() + 120
    while (study := _study(postgres)) is None or \
            sum(t.state == TrialState.COMPLETE for t in study.get_trials()) < 2:
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    finished = {t.number for t in study.get_trials(states=(TrialState.COMPLETE,))}
    subprocess.run([ctl, "stop"], check=True, capture_output=True)
    try:
        time.sleep(5)
    finally:
        subprocess.run([ctl, "start"], check=True, capture_output=True)
    proc.wait(timeout=240)
    out = log.read_text()
    assert "storage unreachable (" in out and ", retrying in 1 s" in out, out[-3000:]
    assert "storage reachable again after" in out and "Traceback" not in out, out[-3000:]
    assert "Caught an error from sqlalchemy" not in out and "Background on this error" not in out, out[-3000:]
    assert "hybrids:hybrids@" not in out.splitlines()[0]  # the password is masked
    assert "12/12 done" in out, out[-3000:]
    trials = _study(postgres).get_trials()
    assert finished <= {t.number for t in trials if t.state == TrialState.COMPLETE}  # nothing finished is lost
    assert sorted(t.params["optim.lr"] for t in trials if t.state == TrialState.COMPLETE) == LRS
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]


def test_a_team_sweep_keeps_study_and_mlflow_runs_on_postgresql(tmp_path, postgres_databases, monkeypatch):
    """Several machines share one PostgreSQL server: the study's storage and MLflow's backend store, each in its
    own database (both keep their schema version in an `alembic_version` table: one database cannot hold both)."""
    from mlflow import MlflowClient

    from hybrids.cli import main

    optuna_db, mlflow_db = postgres_databases(), postgres_databases()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "faults.yaml").write_text(STUDY)
    assert main(["sweep", "study=faults.yaml", f"storage={optuna_db}", f"tracking_uri={mlflow_db}", "n_trials=1",
                 f"artifacts={tmp_path}/artifacts", "train.trainer.max_steps=4", "train.trainer.val_every=4"]) == 0
    (trial,) = [t for t in _study(optuna_db).get_trials() if t.state == TrialState.COMPLETE]
    run = MlflowClient(tracking_uri=mlflow_db).get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["val/loss"] == pytest.approx(trial.value, rel=1e-6)
