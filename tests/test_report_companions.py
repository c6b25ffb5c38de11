"""A companion study (the same protocol, further arms) joins a stored study's report without re-running it; a
study with another protocol is refused in one line."""

import pandas as pd
import pytest

from analysis import ReportError, write_report
from hybrids.cli import main

QUICK = ["seeds=[0]", "lr_grid=[0.003]", "train.trainer.max_steps=4", "train.trainer.val_every=2",
         "train.trainer.ckpt_every=2", "train.trainer.val_batches=1", "train.schedule.warmup_steps=1",
         "train.trainer.batch_size=4", "train.trainer.progress_bar=false", "tracking_uri=none"]


def sweep(tmp_path, *extra):
    return main(["sweep", "study=attention-spacing", f"storage=sqlite:///{tmp_path}/o.db", f"runs_dir={tmp_path}/s",
                 *QUICK, *extra])


def test_a_companion_study_s_arms_join_the_report(tmp_path):
    assert sweep(tmp_path, "space={model.layout: {choices: [M, '2M:A*']}}") == 0
    assert sweep(tmp_path, "name=attention-spacing-more", "space={model.layout: {choices: [A+F]}}") == 0
    result = write_report(f"sqlite:///{tmp_path}/o.db", "attention-spacing", out_dir=tmp_path / "r",
                          log_to_mlflow=False, echo=False, companions=["attention-spacing-more"])
    trials = pd.read_csv(result.out_dir / "trials.csv")
    assert sorted(trials["study"]) == ["attention-spacing", "attention-spacing", "attention-spacing-more"]
    assert trials[trials["study"] == "attention-spacing-more"]["number"].tolist() == [100_000]
    assert len(pd.read_csv(result.out_dir / "arms.csv")) == 3
    assert "joined with attention-spacing-more" in (result.out_dir / "summary.md").read_text()


def test_a_study_with_another_protocol_is_refused(tmp_path):
    assert sweep(tmp_path, "space={model.layout: {choices: [M]}}") == 0
    assert sweep(tmp_path, "name=longer", "space={model.layout: {choices: [A+F]}}", "train.trainer.max_steps=6") == 0
    with pytest.raises(ReportError, match=r"longer is not attention-spacing's protocol \(train.trainer.max_steps 4 "
                                          r"-> 6\); only the arms' choices, variants and block options may differ"):
        write_report(f"sqlite:///{tmp_path}/o.db", "attention-spacing", out_dir=tmp_path / "r", log_to_mlflow=False,
                     echo=False, companions=["longer"])
