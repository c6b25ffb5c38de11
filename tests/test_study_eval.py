"""A study whose objective is an eval score: each trial trains, `hybrids eval` runs on its run, and the eval metric
is the trial's value; a metric eval cannot give, or eval options that name another run, are one line."""

import json
from pathlib import Path

import optuna
import pytest

from blocks import ConfigError
from hybrids.cli import main
from search.checks import check_eval_metric
from search.study_config import load_study

QUICK = ["n_trials=1", "seeds=[0]", "train.trainer.max_steps=4", "train.trainer.val_every=2",
         "train.trainer.ckpt_every=2", "train.trainer.val_batches=1", "train.schedule.warmup_steps=1",
         "train.trainer.batch_size=4", "train.trainer.progress_bar=false"]


def test_a_sweep_scored_by_a_long_copy_probe(tmp_path, capsys):
    metric = "probe/long_copy/64/accuracy"
    assert main(["sweep", "study=attention-spacing", f"storage=sqlite:///{tmp_path}/o.db", f"runs_dir={tmp_path}/s",
                 "tracking_uri=none", "eval=[tasks=long_copy, max_len=64, n=4]", f"metric={metric}", *QUICK]) == 0
    (trial,) = optuna.load_study(study_name="attention-spacing", storage=f"sqlite:///{tmp_path}/o.db").get_trials()
    record = json.loads((Path(trial.user_attrs["run_dir"]) / "eval" / "eval.json").read_text())
    assert trial.value == record["metrics"][metric] == trial.user_attrs["metrics"][metric]
    assert 0.0 <= trial.value <= 1.0 and "val/accuracy" in trial.user_attrs["metrics"]


def test_an_eval_metric_must_be_one_eval_gives():
    check_eval_metric("probe/long_copy/128/accuracy", ["tasks=probes", "max_len=128"])
    check_eval_metric("lm_eval/hellaswag/acc", ["tasks=hellaswag"])
    with pytest.raises(ConfigError, match="metric 'probe/long_copy/256/accuracy' is not one eval gives; with eval="
                                          r"\['tasks=long_copy', 'max_len=128'\] it gives probe/long_copy/64/accuracy, "
                                          "probe/long_copy/128/accuracy"):
        check_eval_metric("probe/long_copy/256/accuracy", ["tasks=long_copy", "max_len=128"])
    with pytest.raises(ConfigError, match="eval runs on each trial's own run, into its own folder"):
        load_study(["study=attention-spacing", "eval=[run=runs/train/x]"])
    with pytest.raises(ConfigError, match="unknown eval option 'depth=3'"):
        load_study(["study=attention-spacing", "eval=[depth=3]"])
