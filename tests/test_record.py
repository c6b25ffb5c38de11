"""The record of a run: git commit, version and command line on every MLflow run; study parent runs
closed as FINISHED, FAILED or KILLED, never left RUNNING."""

import re
import subprocess
import sys

import pytest
from mlflow import MlflowClient

import hybrids
from hybrids.cli import main
from hybrids.training import tracking
from hybrids.training.run import TrainResult
from search.runner import _final_status
from search.storage import counts
from tests.test_sweep import args, load
from tests.test_train import config


def _git(root, *argv):
    subprocess.run(["git", "-C", str(root), *argv], check=True, capture_output=True)


def test_git_state_reads_commit_and_dirty_tree_and_is_absent_outside_a_checkout(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    _git(repo, "add", "a.py")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert tracking.git_state(repo) == (head, False)
    (repo / "scratch.txt").write_text("untracked files do not make the tree dirty\n")
    tracking.git_state.cache_clear()
    assert tracking.git_state(repo) == (head, False)
    (repo / "a.py").write_text("x = 2\n")
    tracking.git_state.cache_clear()
    assert tracking.git_state(repo) == (head, True)
    # a folder inside a repository (an installed copy in a venv, say) is not that repository's code
    (repo / "sub").mkdir()
    assert tracking.git_state(repo / "sub") is None
    assert tracking.git_state(tmp_path / "elsewhere") is None
    tracking.git_state.cache_clear()


def test_record_tags_without_git_keep_version_and_command(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/x/hybrids/cli.py", "train", "model.layout=6M:A*", "trainer.max_steps=5"])
    monkeypatch.setattr(tracking, "git_state", lambda: None)
    assert tracking.record_tags() == {"hybrids.version": hybrids.__version__,
                                      "hybrids.command": "hybrids train 'model.layout=6M:A*' trainer.max_steps=5"}
    assert tracking.command_line(["hybrids", "x" * 9000]) == ("hybrids " + "x" * 9000)[:8000]


def test_training_run_carries_commit_version_and_command(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["hybrids", "train", "trainer.max_steps=2"])
    monkeypatch.setattr(tracking, "git_state", lambda: ("c0ffee" * 6 + "abcd", True))
    result = hybrids.training.run.train(config(tmp_path, "trainer.max_steps=3", "trainer.val_every=3", tracking=True))
    tags = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").get_run(result.mlflow_run_id).data.tags
    assert tags["hybrids.git_commit"] == tags["mlflow.source.git.commit"] == "c0ffee" * 6 + "abcd"
    assert tags["hybrids.git_dirty"] == "true" and tags["hybrids.version"] == "0.1.0"
    assert tags["hybrids.command"] == "hybrids train trainer.max_steps=2"


def _parent(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    return client, client.get_run(load(tmp_path).user_attrs["mlflow_parent_run_id"])


def test_parent_run_is_failed_killed_reopened_and_finished(tmp_path, monkeypatch, capsys):
    """Training is faked: the test is about the parent run's life, not about a trial's numbers."""
    import hybrids.training.run as run

    monkeypatch.setattr(sys, "argv", ["hybrids", "sweep", "study=attention-spacing"])
    sweep = ["sweep", *args(tmp_path, "n_trials=1", "seeds=[0]")]

    def crash(config, callbacks=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(run, "train", crash)
    with pytest.raises(RuntimeError, match="boom"):
        main(sweep)
    assert _parent(tmp_path)[1].info.status == "FAILED"

    def interrupt(config, callbacks=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "train", interrupt)
    assert main(sweep) == 130
    assert _parent(tmp_path)[1].info.status == "KILLED"

    seen = []

    def finish(config, callbacks=None):
        client, parent = _parent(tmp_path)
        seen.append(parent.info.status)
        return TrainResult(tmp_path / "fake", {"val/accuracy": 0.25, "val/loss": 1.5}, 6)

    monkeypatch.setattr(run, "train", finish)
    assert main(sweep) == 0
    client, parent = _parent(tmp_path)
    assert seen == ["RUNNING"]  # the top-up re-opened the killed run while its trial ran
    assert parent.info.status == "FINISHED" and counts(load(tmp_path))["complete"] == 1
    assert parent.data.metrics["best/val/accuracy"] == 0.25 and parent.data.metrics["trials_done"] == 1
    assert parent.data.tags["hybrids.command"] == "hybrids sweep study=attention-spacing"
    assert parent.data.tags["hybrids.version"] == "0.1.0"
    assert ("hybrids.git_commit" in parent.data.tags) == (tracking.git_state() is not None)
    out = capsys.readouterr().out
    assert "trial   1 start    model.layout=M, optim.lr=0.001  seed 0  retry of trial 0\n" in out
    assert re.search(r"^trial   2 complete   0\.2500  model\.layout=M, optim\.lr=0\.001  6M  seed 0  \ds  0 left$",
                     out, re.M), out


@pytest.mark.parametrize("exitcodes, status", [([0, 0], "FINISHED"), ([0, 130], "KILLED"), ([-15, 0], "KILLED"),
                                               ([-9, 1], "KILLED"), ([1, 0], "FAILED")])
def test_status_of_a_multi_worker_sweep_follows_its_workers_exit_codes(exitcodes, status):
    assert _final_status(exitcodes) == status
