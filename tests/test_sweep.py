"""Sweeps: a 2-trial study end to end, top-up, a worker killed with SIGKILL mid-trial, SIGTERM."""

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from hybrids.cli import main
from search.storage import counts
from search.study_config import STUDIES

FAST = ["train.trainer.max_steps=6", "train.trainer.val_every=3", "train.trainer.ckpt_every=3",
        "train.trainer.val_batches=1", "train.schedule.warmup_steps=1", "train.trainer.batch_size=8"]


def args(tmp_path, *extra):
    return ["study=attention-spacing", f"storage=sqlite:///{tmp_path}/optuna.db", f"runs_dir={tmp_path}/sweeps",
            f"tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"artifacts={tmp_path}/artifacts", *extra]


def load(tmp_path, name="attention-spacing"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/optuna.db")


def test_two_trial_sweep_keeps_everything_and_tops_up(tmp_path, capsys):
    one = ["n_trials=2", "seeds=[0]", "lr_grid=[0.003]"]  # one lr: the first two grid points are two layouts
    assert main(["sweep", *args(tmp_path, *one, *FAST)]) == 0
    study = load(tmp_path)
    assert study.user_attrs["arm_by"] == ["model.layout"] and study.user_attrs["lr_grid"] == [0.003]
    assert study.user_attrs["match_by"] == "params" and study.user_attrs["match_budget"] == 199_936
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert [t.params["model.layout"] for t in trials] == ["M", "2M:A*"]
    for t in trials:
        assert 0.0 <= t.value <= 1.0 and t.value == t.user_attrs["metrics"]["val/accuracy"]
        assert "layout: " in t.user_attrs["config_yaml"] and t.user_attrs["mlflow_run_id"]
    assert [t.user_attrs["layout"] for t in trials] == ["6M", "(2M:A*)x2:2M"]
    assert [t.user_attrs["n_attention"] for t in trials] == [0, 2]
    assert [t.user_attrs["d_model"] for t in trials] == [90, 64]  # M widened to the hybrid's parameter count
    assert [t.params["optim.lr"] for t in trials] == [0.003, 0.003]

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    parent = study.user_attrs["mlflow_parent_run_id"]
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.info.run_id for r in children) == sorted(t.user_attrs["mlflow_run_id"] for t in trials)

    # the same command again adds nothing; a larger target tops up by the difference
    assert main(["sweep", *args(tmp_path, *one, *FAST)]) == 0
    assert len(load(tmp_path).get_trials()) == 2
    assert main(["sweep", *args(tmp_path, "n_trials=3", "seeds=[0]", "lr_grid=[0.003]", *FAST)]) == 0
    assert counts(load(tmp_path))["complete"] == 3 and len(load(tmp_path).get_trials()) == 3
    assert "3/3 done" in capsys.readouterr().out


def test_unknown_study_and_sqlite_with_workers_fail_in_one_line(tmp_path, capsys):
    assert main(["sweep", "study=nope"]) == 2
    assert ("unknown study 'nope'; built-in studies: annealing, annealing-robustness, arch-data-duration, "
            "attention-spacing") in capsys.readouterr().err
    assert main(["sweep", *args(tmp_path, "workers=2")]) == 2
    assert "several workers need a journal file or an RDB storage" in capsys.readouterr().err


SLOW = ["n_trials=2", "seeds=[0]", "lr_grid=[0.003]", "train.trainer.max_steps=150", "train.trainer.val_every=75",
        "train.trainer.ckpt_every=5", "train.trainer.val_batches=1", "train.schedule.warmup_steps=1",
        "train.trainer.batch_size=8"]


def _sweep_process(tmp_path, *extra):
    cmd = [sys.executable, "-m", "hybrids.cli", "sweep", *args(tmp_path, *SLOW, *extra)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_for_checkpoint(tmp_path, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list((tmp_path / "sweeps").glob("attention-spacing-*/trial-0000/checkpoints/last.ckpt")):
            return
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        time.sleep(0.5)
    raise AssertionError("no checkpoint appeared")


def test_worker_killed_mid_trial_is_recovered_without_loss_or_duplicates(tmp_path):
    proc = _sweep_process(tmp_path, "heartbeat_interval=0.5")
    _wait_for_checkpoint(tmp_path, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    study = load(tmp_path)
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING, TrialState.WAITING]
    time.sleep(2.5)
    # the restart sees a stale heartbeat: the trial is failed and retried from its own checkpoint
    code = main(["sweep", *args(tmp_path, *SLOW, "grace_period=2", "heartbeat_interval=0.5")])
    assert code == 0
    trials = load(tmp_path).get_trials()
    states = [t.state for t in trials]
    assert states.count(TrialState.FAIL) == 1 and states.count(TrialState.COMPLETE) == 2
    retry = next(t for t in trials if "retry_of" in t.user_attrs)
    assert retry.user_attrs["retry_of"] == 0 and retry.params == trials[0].params
    assert retry.user_attrs["run_dir"].endswith("trial-0000")
    assert sorted(t.params["model.layout"] for t in trials if t.state == TrialState.COMPLETE) == ["2M:A*", "M"]


def test_sigterm_records_the_trial_as_failed_never_running(tmp_path):
    proc = _sweep_process(tmp_path)
    _wait_for_checkpoint(tmp_path, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 130, out[-2000:]
    assert "recorded as failed" in out and "Traceback" not in out
    assert "trial   0 start    model.layout=M, optim.lr=0.003  seed 0\n" in out
    for banner in ("GPU available", "TPU available", "LOCAL_RANK", "You are using a CUDA device", "View run",
                   "litlogger", "database tables", "alembic", "`Trainer.fit` stopped"):
        assert banner not in out, out
    trials = load(tmp_path).get_trials()
    # the worker that failed the trial queued its retry (last): the same command resumes it from its checkpoint
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING, TrialState.WAITING]
    assert trials[2].user_attrs["retry_of"] == 0 and trials[2].system_attrs["fixed_params"] == trials[0].params
    from mlflow import MlflowClient

    parent = load(tmp_path).user_attrs["mlflow_parent_run_id"]
    assert MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").get_run(parent).info.status == "KILLED"


if __name__ == "__main__":
    pytest.main([__file__, "-q"])


@pytest.mark.parametrize("name", sorted(p.stem for p in STUDIES.glob("*.yaml")))
def test_every_shipped_study_composes_its_trials(name):
    from hybrids.training.config import compose
    from search.identity import StudyIdentity
    from search.objective import Objective
    from search.study_config import load_study

    config, extra = load_study([f"study={name}"])
    assert config.n_trials >= 2 and config.question
    objective = Objective(config, StudyIdentity(name, 1, "0123456789"), extra, parent_run_id=None)
    for point in config.grid()[:2]:
        trial_config = compose(objective.overrides(point, 0))
        assert trial_config.run.name == "trial-0000"
