"""The paper's checks as studies: a 2-trial run of each new study at 3-4 steps, and what its report shows."""

from pathlib import Path

import optuna
import pytest

from analysis import write_report
from blocks import ConfigError
from hybrids.cli import main
from search.study_config import load_study
from tests.test_train import metric_rows

TINY = ["seeds=[0]", "n_trials=2", "lr_grid=[0.003]", "tracking_uri=none", "train.trainer.val_batches=1",
        "train.trainer.batch_size=4", "train.schedule.warmup_steps=1"]
LM = ["train.task.max_bytes=200000"]  # seq_len stays 128: the phase-2 tasks name it


def sweep(tmp_path, name, *extra):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    assert main(["sweep", f"study={name}", f"storage={storage}", f"runs_dir={tmp_path}/sweeps", *TINY, *extra]) == 0
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    report = write_report(storage, name, out_dir=tmp_path / "report", log_to_mlflow=False, echo=False)
    return trials, report


def test_shared_attention_icl_two_trials_and_kv_column(tmp_path, one_thread):
    trials, report = sweep(tmp_path, "shared-attention-icl", "train.trainer.max_steps=3", "train.trainer.val_every=3",
                           "space={arm: {choices: [mamba, shared]}, variant: {choices: [in_context_recall]}}")
    assert [t.params["arm"] for t in trials] == ["mamba", "shared"]
    assert [t.user_attrs["layout"] for t in trials] == ["6M", "(2M:A*)x2:2M"]
    assert [t.user_attrs["kv_bytes"] for t in trials] == [0, 65_536]  # 2 invocations x K,V x 4 x 64 x 64 x 2 B
    assert list(report.arms["kv_bytes"].sort_values()) == [0, 65_536]
    assert "| KV cache |" in report.markdown and "| 64.0 KiB |" in report.markdown


def test_annealing_robustness_two_trials_show_forgetting(tmp_path, one_thread):
    trials, report = sweep(tmp_path, "annealing-robustness", *LM, "train.trainer.max_steps=4",
                           "train.trainer.val_every=2", "train.++schedule.rewarm_steps=0",
                           "train.++schedule.phase2_start=0.5", "space={arm: {choices: [linear, two_phase_hq]}}")
    linear, two_phase = (t.user_attrs["metrics"] for t in trials)
    assert "forgetting" not in linear
    phase1 = metric_rows(Path(trials[1].user_attrs["run_dir"]), "val/phase1_loss")
    assert sorted(phase1) == [1, 3]  # validations after 2 steps (the phase boundary) and 4
    assert two_phase["forgetting"] == pytest.approx(phase1[3] - phase1[1], rel=1e-5)
    assert two_phase["val/phase1_loss"] == pytest.approx(two_phase["val/loss"])
    assert "forgetting" in report.markdown.split("## Configurations")[1].splitlines()[4]  # a column of the table


def test_arch_data_duration_report_decomposes_the_variance(tmp_path, one_thread):
    _, report = sweep(tmp_path, "arch-data-duration", *LM, "train.trainer.val_every=2",
                      "train.++schedule.rewarm_steps=0", "train.schedule.warmup_steps=0",
                      "space={model.layout: {choices: [M2, '2M2:A*']}, variant: {choices: [curated]}, "
                      "trainer.max_steps: {choices: [4]}}")
    assert "## Variance explained" in report.markdown
    table = (report.out_dir / "variance.csv").read_text().splitlines()
    assert table[0] == "effect,order,ss,df,share"
    assert table[1].startswith("model.layout,1,") and table[1].endswith(",1.0")  # the only factor that varies


def test_attention_spacing_placement_two_trials(tmp_path, one_thread):
    trials, _ = sweep(tmp_path, "attention-spacing-placement", "train.trainer.max_steps=3",
                      "train.trainer.val_every=3")
    assert [t.user_attrs["n_attention"] for t in trials] == [0, 1]
    assert [t.user_attrs["d_model"] for t in trials] == [92, 66]  # both widened to (2M:A*)x3's parameters


def test_an_arm_without_overrides_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="^arm choice\\(s\\) nope have no entry under 'variants'$"):
        load_study(["study=annealing-robustness", "space={arm: {choices: [cosine, nope]}}"])


def test_forgetting_is_a_metric_a_two_phase_study_may_optimise(tmp_path):
    from search.checks import check_study

    common = ["study=annealing-robustness", "metric=forgetting", "seeds=[0]", "lr_grid=[0.003]", "tracking_uri=none",
              f"runs_dir={tmp_path}/sweeps", f"storage=sqlite:///{tmp_path}/optuna.db", "train.task.max_bytes=200000"]
    config, extra = load_study([*common, "space={arm: {choices: [two_phase_hq]}}"])
    check_study(config, extra)  # no error: a two-phase trial logs it
    cosine, extra = load_study([*common, "space={arm: {choices: [cosine]}}"])
    with pytest.raises(ConfigError, match="metric 'forgetting' is not logged"):
        check_study(cosine, extra)
