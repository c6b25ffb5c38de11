"""Bad input around runs (issue 8): broken checkpoints, read-only folders, Ctrl-C, a trial still RUNNING.

Each case asserts the exit code and the one line the user reads; nothing the user has is deleted.
"""

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from hybrids import ui
from hybrids.cli import main
from hybrids.training import files
from search.identity import resolve
from search.storage import open_storage
from search.study_config import load_study

QUICK = ["model=mamba-tiny", "task.num_kv_pairs=4", "task.seq_len=32", "task.vocab_size=64", "trainer.batch_size=8",
         "trainer.progress_bar=false", "schedule.warmup_steps=1", "trainer.val_every=100", "trainer.val_batches=1",
         "tracking.enabled=false", "run.name=r"]


def train_args(tmp_path, *extra):
    return ["train", f"run.dir={tmp_path}/train", *QUICK, *extra]


@pytest.fixture
def trained(tmp_path, capsys):
    """A finished 6-step run with checkpoints last.ckpt, step000006.ckpt and best.ckpt."""
    assert main(train_args(tmp_path, "trainer.max_steps=6", "trainer.ckpt_every=3", "trainer.val_every=3")) == 0
    capsys.readouterr()
    ckpts = tmp_path / "train" / "r" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt", "step000006.ckpt"]
    return ckpts


@pytest.mark.parametrize("damage", [b"", b"not a checkpoint", "truncate"])
def test_broken_last_ckpt_falls_back_to_the_newest_intact_one(tmp_path, trained, damage, capsys):
    last = trained / "last.ckpt"
    if damage == "truncate":
        last.write_bytes(last.read_bytes()[:5000])
    else:
        last.write_bytes(damage)
    broken = last.read_bytes()
    os.utime(trained / "best.ckpt", (1, 1))  # older than step000006.ckpt: the step file is the newest intact one
    assert main(train_args(tmp_path, "trainer.max_steps=9", "trainer.ckpt_every=3", "trainer.val_every=3")) == 0
    err = capsys.readouterr().err
    reason = "empty file" if damage == b"" else "not a readable checkpoint: File is not a zip file"
    assert (f"hybrids: checkpoint {last} is broken ({reason}); kept as last.ckpt.broken, resuming from "
            f"{trained / 'step000006.ckpt'}") in err.splitlines()
    assert (trained / "last.ckpt.broken").read_bytes() == broken  # the user's file is kept, byte for byte
    assert files.broken_reason(last) is None  # the resumed run wrote a fresh last.ckpt at step 9


def test_no_intact_checkpoint_names_every_broken_file(tmp_path, trained, capsys):
    for p in trained.iterdir():
        p.write_bytes(b"")
    os.utime(trained / "best.ckpt", (1, 1))
    assert main(train_args(tmp_path, "trainer.max_steps=9", "trainer.ckpt_every=3", "trainer.val_every=3")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == f"hybrids: continuing {trained.parent} with trainer.max_steps 6 -> 9"
    assert err[1] == (f"hybrids: error: cannot resume: no intact checkpoint in {trained}: {trained}/last.ckpt (empty "
                   f"file); {trained}/step000006.ckpt (empty file); {trained}/best.ckpt (empty file); move them "
                   "away to start the run afresh")
    assert sorted(p.name for p in trained.iterdir()) == ["best.ckpt", "last.ckpt", "step000006.ckpt"]


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A read-only folder ro/; as root (whom file modes don't stop) os.access is told the same."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if (mode & os.W_OK) and str(p).startswith(
            str(folder)) else real(p, mode, **kw))
    yield folder
    folder.chmod(0o755)


def test_read_only_runs_folder_train(tmp_path, read_only, capsys):
    assert main(["train", f"run.dir={read_only}/train", *QUICK[:-1], "run.name=r", "trainer.max_steps=2"]) == 2
    assert capsys.readouterr().err.strip() == (f"hybrids: error: cannot write the run folder {read_only}/train/r: "
                                               f"{read_only} is read-only")


def test_read_only_runs_folder_sweep(tmp_path, read_only, capsys):
    code = main(["sweep", "study=attention-spacing", f"storage=sqlite:///{read_only}/optuna.db",
                 f"runs_dir={tmp_path}/sweeps", f"tracking_uri=sqlite:///{tmp_path}/mlflow.db",
                 f"artifacts={tmp_path}/artifacts"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (f"hybrids: error: cannot write the study storage "
                                               f"{read_only}/optuna.db: {read_only} is read-only")
    assert main(["sweep", "study=attention-spacing", f"runs_dir={read_only}/sweeps"]) == 2
    assert capsys.readouterr().err.strip() == (f"hybrids: error: cannot write the trial folder {read_only}/sweeps: "
                                               f"{read_only} is read-only")
    assert not (tmp_path / "mlflow.db").exists()


def test_read_only_report_folder(tmp_path, read_only, capsys):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    study.add_trial(optuna.trial.create_trial(params={"x": 1}, distributions={
        "x": optuna.distributions.CategoricalDistribution([1])}, value=0.5))
    assert main(["report", "study=s", f"storage={storage}", f"out={read_only}/report", "mlflow=false"]) == 2
    assert capsys.readouterr().err.strip() == (f"hybrids: error: cannot write the report folder {read_only}/report: "
                                               f"{read_only} is read-only")


FAST = ["train.trainer.max_steps=4", "train.trainer.val_every=2", "train.trainer.ckpt_every=2",
        "train.trainer.val_batches=1", "train.schedule.warmup_steps=1", "train.trainer.batch_size=8"]


def sweep_args(tmp_path, *extra):
    return ["sweep", "study=attention-spacing", f"storage=sqlite:///{tmp_path}/study.db", f"runs_dir={tmp_path}/sw",
            f"tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"artifacts={tmp_path}/artifacts", "seeds=[0]", *FAST,
            *extra]


def test_ctrl_c_during_trial_set_up_records_the_trial_as_failed(tmp_path, monkeypatch, capsys):
    import search.objective

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(search.objective, "parse_layout", interrupted)  # after compose and accounting
    assert main(sweep_args(tmp_path, "n_trials=1")) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("hybrids: trial 0 interrupted: recorded as failed; run the same "
                                            "command again to resume it from its checkpoint")
    study = optuna.load_study(study_name="attention-spacing", storage=f"sqlite:///{tmp_path}/study.db")
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.WAITING]  # and its retry, queued


def test_rerun_within_the_grace_period_says_which_trial_runs_and_when_it_is_retried(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path}/study.db"
    args = sweep_args(tmp_path, "n_trials=1", "grace_period=100", "heartbeat_interval=1")
    config, extra = load_study(args[1:])
    study, _, _ = resolve(open_storage(storage), config, extra)  # the very study the sweep below finds
    study.enqueue_trial({"model.layout": "M"})
    trial = study.ask()  # RUNNING, as if another worker were training it
    study._storage.set_trial_system_attr(trial._trial_id, "heartbeat", time.time() - 10)
    start = time.time()
    assert main(args) == 0
    took = time.time() - start
    out = capsys.readouterr().out.splitlines()
    line = next(x for x in out if x.startswith("trial 0 is still RUNNING"))
    assert line.startswith("trial 0 is still RUNNING (its worker beat within grace_period = 100 s): left to that "
                           "worker; if the worker is gone, the trial counts as stale and is retried by a run started "
                           "in ")
    # 100 s grace - 10 s since the beat - this run's start-up
    assert 89 - took <= int(line.split(" in ")[-1].removesuffix(" s or later")) <= 90
    # the next step names the study's own store, and `hybrids ui` finds it through the MLflow parent run
    assert out[-1] == f"next: hybrids report study=attention-spacing storage={storage}"
    assert ui.study_storages(f"sqlite:///{tmp_path}/mlflow.db") == [storage]
    assert ui.dashboard_hint("journal:runs/x.journal").split()[2] == "runs/x.journal"


def test_ctrl_c_on_train_exits_130_and_says_how_to_resume(tmp_path):
    argv = train_args(tmp_path, "trainer.max_steps=100000", "trainer.ckpt_every=2")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # a shell starts background jobs with SIGINT ignored, and Python then never raises KeyboardInterrupt: give the
    # child the default disposition of a command run in a terminal, whatever started the test
    proc = subprocess.Popen([sys.executable, "-m", "hybrids.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (tmp_path / "train" / "r" / "checkpoints" / "last.ckpt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == ("hybrids: interrupted; the same command resumes the run from its last "
                                            "checkpoint: hybrids train " + " ".join(argv[1:]))
