"""A study is identified by itself: same-named studies elsewhere, and changed settings, never reuse results."""

import hashlib
import json

import optuna
import pytest
from optuna.trial import TrialState

from analysis import ReportError, write_report
from hybrids.cli import main
from hybrids.training.config import differences

FAST = ["n_trials=1", "seeds=[0]", "train.trainer.max_steps=4", "train.trainer.val_every=2",
        "train.trainer.ckpt_every=2", "train.trainer.val_batches=1", "train.schedule.warmup_steps=1",
        "train.trainer.batch_size=4"]


def sweep(tmp_path, store, *extra):
    return main(["sweep", "study=attention-spacing", f"storage=sqlite:///{tmp_path}/{store}",
                 f"runs_dir={tmp_path}/sweeps", f"tracking_uri=sqlite:///{tmp_path}/mlflow.db",
                 f"artifacts={tmp_path}/artifacts", *FAST, *extra])


def trials(tmp_path, store, name="attention-spacing"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/{store}").get_trials()


def digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_same_named_study_in_another_storage_trains_afresh_and_touches_nothing(tmp_path, capsys):
    assert sweep(tmp_path, "a.db") == 0
    (first,) = trials(tmp_path, "a.db")
    first_dir = tmp_path / "sweeps" / first.user_attrs["run_dir"].split("/sweeps/")[1]
    before = digest(first_dir)
    assert any(name.endswith("last.ckpt") for name in before)

    # the reproduction: the same study name on another storage (or after a.db is deleted)
    assert sweep(tmp_path, "b.db") == 0
    (second,) = trials(tmp_path, "b.db")
    assert second.state == TrialState.COMPLETE
    assert second.user_attrs["run_dir"] != first.user_attrs["run_dir"]
    assert second.user_attrs["mlflow_run_id"] != first.user_attrs["mlflow_run_id"]
    assert digest(first_dir) == before  # the first study's checkpoints and run record are untouched
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    steps = [m.step for m in client.get_metric_history(first.user_attrs["mlflow_run_id"], "train/loss")]
    assert steps == sorted(set(steps))  # no second run appended to the first study's MLflow run

    a = write_report(f"sqlite:///{tmp_path}/a.db", "attention-spacing", log_to_mlflow=False, echo=False)
    b = write_report(f"sqlite:///{tmp_path}/b.db", "attention-spacing", log_to_mlflow=False, echo=False)
    assert a.out_dir != b.out_dir and a.out_dir.name.startswith("attention-spacing-")
    assert json.loads((a.out_dir / "study.json").read_text())["storage"].endswith("a.db")
    with pytest.raises(ReportError, match="holds the report of another study"):
        write_report(f"sqlite:///{tmp_path}/b.db", "attention-spacing", out_dir=a.out_dir, echo=False)


def test_changed_training_settings_start_a_new_version_and_the_old_one_is_kept(tmp_path, capsys):
    assert sweep(tmp_path, "s.db") == 0
    capsys.readouterr()
    # the README's advice "scale the same study up with overrides": never "1/1 done" with the overrides ignored
    assert sweep(tmp_path, "s.db", "train.trainer.max_steps=6") == 0
    out = capsys.readouterr().out
    assert ("settings differ from the stored attention-spacing (train.trainer.max_steps 4 -> 6); started version 2 "
            "as attention-spacing.v2") in out
    assert "next: hybrids report study=attention-spacing.v2 storage=" in out
    (v1,) = trials(tmp_path, "s.db")
    (v2,) = trials(tmp_path, "s.db", "attention-spacing.v2")
    assert "max_steps: 4\n" in v1.user_attrs["config_yaml"] and "max_steps: 6\n" in v2.user_attrs["config_yaml"]
    assert v1.user_attrs["run_dir"] != v2.user_attrs["run_dir"]

    # each setting finds its own version again: nothing is added, nothing is retrained
    assert sweep(tmp_path, "s.db") == 0
    assert sweep(tmp_path, "s.db", "train.trainer.max_steps=6") == 0
    assert len(trials(tmp_path, "s.db")) == 1 and len(trials(tmp_path, "s.db", "attention-spacing.v2")) == 1
    assert "settings differ" not in capsys.readouterr().out
    # a larger target tops up the matching version instead of starting another
    assert sweep(tmp_path, "s.db", "train.trainer.max_steps=6", "n_trials=2") == 0
    assert len(trials(tmp_path, "s.db", "attention-spacing.v2")) == 2
    assert "attention-spacing.v3" not in optuna.get_all_study_names(f"sqlite:///{tmp_path}/s.db")
    report = write_report(f"sqlite:///{tmp_path}/s.db", "attention-spacing", log_to_mlflow=False, echo=False)
    assert "other versions of this study in the storage: attention-spacing.v2" in report.text


def test_differences_name_each_changed_key():
    old = {"train.optim.lr": 0.003, "seeds": "[0, 1]"}
    new = {"train.optim.lr": 0.001, "seeds": "[0, 1]", "train.task.power_a": 0.01}
    assert differences(old, new) == "train.optim.lr 0.003 -> 0.001, train.task.power_a (unset) -> 0.01"


def test_a_named_run_folder_is_never_resumed_under_other_settings(tmp_path, capsys):
    base = ["train", "model=llama-tiny", "task=mqar", "trainer.max_steps=2", "trainer.val_every=2",
            "schedule.warmup_steps=1", "trainer.ckpt_every=2", "trainer.val_batches=1", "trainer.batch_size=4",
            "tracking.enabled=false", f"run.dir={tmp_path}", "run.name=mine"]
    assert main(base) == 0
    kept = digest(tmp_path / "mine")
    assert main([*base, "model.d_model=48"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/mine holds a run with other settings (model.d_model " in err and "-> 48)" in err
    assert digest(tmp_path / "mine") == kept
    assert main(base) == 0  # the same settings resume (here: already finished) as before


def test_a_study_without_tracking_writes_no_mlflow_store(tmp_path):
    assert sweep(tmp_path, "t.db", "tracking_uri=none") == 0
    (trial,) = trials(tmp_path, "t.db")
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["mlflow_run_id"] is None
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "artifacts").exists()
    assert "mlflow_parent_run_id" not in optuna.load_study(study_name="attention-spacing",
                                                           storage=f"sqlite:///{tmp_path}/t.db").user_attrs


def test_a_field_added_since_a_study_was_stored_forks_it_only_where_the_field_can_act(tmp_path, capsys):
    """A study stored before data.reset_at_boundaries and schedule.step_drops existed resumes (its task has no
    documents, its schedule is cosine); a field that acts on the runs still starts a new version."""
    assert sweep(tmp_path, "a.db") == 0
    study = optuna.load_study(study_name="attention-spacing", storage=f"sqlite:///{tmp_path}/a.db")
    older = {k: v for k, v in study.user_attrs["settings"].items()
             if k not in ("train.data.reset_at_boundaries", "train.schedule.step_drops")}
    study.set_user_attr("settings", older)
    study.set_user_attr("fingerprint", "stored-by-an-older-hybrids")
    capsys.readouterr()
    assert sweep(tmp_path, "a.db", "train.++schedule.step_drops=3") == 0  # cosine reads no step_drops
    assert "started version" not in capsys.readouterr().out
    assert [s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{tmp_path}/a.db")] == ["attention-spacing"]
    assert sweep(tmp_path, "a.db", "train.schedule.min_lr_ratio=0.5") == 0
    out = capsys.readouterr().out
    assert "train.schedule.min_lr_ratio 0.1 -> 0.5); started version 2" in out
