"""Reports of studies with task settings (a `variant` param): arms compared within each setting, the score over
settings (MAD score) with its spread over seeds, and one row per arm at its best learning rate."""

import json

import optuna
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from analysis import StudyMeta, study_frame, write_report
from analysis.arms import arms_frame, at_best
from analysis.frames import load_study
from analysis.score import all_settings, score_cells, score_frame, score_name

optuna.logging.set_verbosity(optuna.logging.WARNING)

SETTINGS = ["recall", "copy", "compress"]
LRS = [1e-3, 1e-2]
# (layout, setting) -> lr -> values of seeds 0 and 1; M+F never ran `compress` (a partial score)
VALUES = {
    ("A+F", "recall"): {1e-3: (0.90, 0.96), 1e-2: (0.50, 0.60)},
    ("A+F", "copy"): {1e-3: (0.30, 0.40), 1e-2: (0.20, 0.20)},
    ("A+F", "compress"): {1e-3: (0.50, 0.60), 1e-2: (0.10, 0.10)},
    ("M+F", "recall"): {1e-3: (0.40, 0.50), 1e-2: (0.60, 0.70)},
    ("M+F", "copy"): {1e-3: (0.80, 0.90), 1e-2: (0.50, 0.50)},
    ("A+F:M+F", "recall"): {1e-3: (0.88, 0.92), 1e-2: (0.20, 0.30)},
    ("A+F:M+F", "copy"): {1e-3: (0.60, 0.70), 1e-2: (0.75, 0.85)},
    ("A+F:M+F", "compress"): {1e-3: (0.40, 0.50), 1e-2: (0.45, 0.55)},
}
DISTRIBUTIONS = {"model.layout": CategoricalDistribution(["A+F", "M+F", "A+F:M+F"]),
                 "variant": CategoricalDistribution(SETTINGS), "optim.lr": CategoricalDistribution(LRS),
                 "trainer.seed": IntDistribution(0, 2)}


def _settings_study(storage, name, lr_grid=LRS):
    """3 architectures x 3 settings (one missing) x 2 learning rates x 2 seeds, as a MAD sweep records them, plus
    a failed trial at an arm's best lr and one at another lr."""
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    for key, value in {"metric": "val/accuracy", "direction": "maximize", "kind": "ablation",
                       "group_by": ["model.layout", "variant", "optim.lr"], "arm_by": ["model.layout", "variant"],
                       "lr_grid": lr_grid, "settings": {"space.variant.choices": json.dumps(SETTINGS)}}.items():
        study.set_user_attr(key, value)
    for (layout, setting), by_lr in VALUES.items():
        for lr, values in by_lr.items():
            for seed, value in enumerate(values):
                params = {"model.layout": layout, "variant": setting, "optim.lr": lr, "trainer.seed": seed}
                attrs = {"layout": layout, "params_unique": 1000 + 10 * len(layout), "seed": seed,
                         "arm": f"model.layout={layout}, variant={setting}",
                         "group": f"model.layout={layout}, variant={setting}, optim.lr={lr}"}
                study.add_trial(create_trial(params=params, distributions=DISTRIBUTIONS, value=value,
                                             user_attrs=attrs))
    for lr in LRS:  # M+F on copy: best at 1e-3; A+F on recall: best at 1e-3, so the 1e-2 failure is not shown
        layout, setting = ("M+F", "copy") if lr == 1e-3 else ("A+F", "recall")
        study.add_trial(create_trial(params={"model.layout": layout, "variant": setting, "optim.lr": lr,
                                             "trainer.seed": 2}, distributions=DISTRIBUTIONS,
                                     state=TrialState.FAIL, user_attrs={"fail_reason": "non-finite loss"}))


@pytest.fixture(scope="module")
def mad_report(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("mad")
    storage = optuna.storages.InMemoryStorage()  # SQLite would take seconds to take 34 trials
    _settings_study(storage, "mad")
    return write_report(storage, "mad", out_dir=tmp_path / "report", echo=False, log_to_mlflow=False)


def test_arms_are_ranked_and_compared_within_each_setting(mad_report):
    arms = mad_report.arms
    assert arms["setting"].tolist() == ["recall"] * 3 + ["copy"] * 3 + ["compress"] * 2
    assert arms["architecture"].tolist() == [
        "model.layout=A+F", "model.layout=A+F:M+F", "model.layout=M+F",
        "model.layout=M+F", "model.layout=A+F:M+F", "model.layout=A+F",
        "model.layout=A+F", "model.layout=A+F:M+F"]
    assert arms["mean"].tolist() == pytest.approx([0.93, 0.90, 0.65, 0.85, 0.80, 0.35, 0.55, 0.50])
    assert arms["best_lr"].tolist() == [1e-3, 1e-3, 1e-2, 1e-3, 1e-2, 1e-3, 1e-3, 1e-2]
    assert mad_report.statements == [
        "The arms are not budget-matched (the study sets no `match`): a difference may come from their size, not "
        "their architecture.",
        "best lr at the grid's edge for arms 8 of 8 (the table's \"lr at edge\" column): widen lr_grid",
        "recall: no difference at this budget: model.layout=A+F [0.9, 0.96] and model.layout=A+F:M+F [0.88, 0.92] "
        "overlap over seeds",
        "recall: model.layout=A+F [0.9, 0.96] beats model.layout=M+F [0.6, 0.7]: their ranges over seeds do not "
        "overlap",
        "copy: no difference at this budget: model.layout=M+F [0.8, 0.9] and model.layout=A+F:M+F [0.75, 0.85] "
        "overlap over seeds",
        "copy: model.layout=M+F [0.8, 0.9] beats model.layout=A+F [0.3, 0.4]: their ranges over seeds do not "
        "overlap",
        "compress: no difference at this budget: model.layout=A+F [0.5, 0.6] and model.layout=A+F:M+F [0.45, 0.55] "
        "overlap over seeds"]
    md = mad_report.markdown
    assert "| setting | arm | params | vs reference | best lr |" in md
    assert "| copy | `model.layout=M+F` | 1.03k | - | 0.001 | 0.85 | [0.8, 0.9] | 2 | yes: widen lr_grid |" in md
    assert "**Best configuration:**" not in md
    assert "- recall: `model.layout=A+F` val/accuracy 0.93 [0.9, 0.96] at lr 0.001" in md
    assert "- compress: `model.layout=A+F` val/accuracy 0.55 [0.5, 0.6] at lr 0.001" in md


def test_mad_score_is_the_mean_over_settings_with_a_spread_over_seeds(mad_report):
    score = mad_report.score
    assert score["architecture"].tolist() == ["model.layout=A+F:M+F", "model.layout=A+F", "model.layout=M+F"]
    assert score["mean"].tolist() == pytest.approx([(0.90 + 0.80 + 0.50) / 3, (0.93 + 0.35 + 0.55) / 3, 0.75])
    # seed s: the mean over settings of seed s's value at each setting's best lr
    assert score["min"].tolist() == pytest.approx([(0.88 + 0.75 + 0.45) / 3, (0.90 + 0.30 + 0.50) / 3, 0.70])
    assert score["max"].tolist() == pytest.approx([(0.92 + 0.85 + 0.55) / 3, (0.96 + 0.40 + 0.60) / 3, 0.80])
    assert score["n"].tolist() == [2, 2, 2]
    assert score["settings"].tolist() == [3, 3, 2] and score["of"].tolist() == [3, 3, 3]
    md = mad_report.markdown
    assert "## MAD score" in md
    assert "| architecture | MAD score (val/accuracy) | range over seeds | seeds | settings |" in md
    assert "| `model.layout=A+F:M+F` | 0.7333 | [0.693, 0.773] | 2 | 3/3 |" in md
    assert "| `model.layout=M+F` | 0.75 | [0.7, 0.8] | 2 | 2/3 (partial) |" in md
    assert "- model.layout=A+F:M+F [0.693, 0.773] beats model.layout=A+F [0.567, 0.653]: their ranges over seeds " \
           "do not overlap" in md
    assert "- partial MAD score (not comparable with a full one): model.layout=M+F over 2/3 settings" in md
    csv = pd.read_csv(mad_report.out_dir / "score.csv")
    assert csv["mean"].tolist() == pytest.approx(score["mean"].tolist())


def test_tables_and_figures_show_one_row_per_arm_at_its_best_lr(mad_report):
    summary = mad_report.summary
    assert len(summary) == 8  # 8 arms, not 16 (arm, lr) configurations
    assert summary["setting"].tolist() == ["recall"] * 3 + ["copy"] * 3 + ["compress"] * 2
    assert summary["group"].tolist()[3:6] == ["model.layout=M+F, variant=copy, optim.lr=0.001",
                                              "model.layout=A+F:M+F, variant=copy, optim.lr=0.01",
                                              "model.layout=A+F, variant=copy, optim.lr=0.001"]
    assert summary["failed"].tolist() == [0, 0, 0, 1, 0, 0, 0, 0]  # the failure at another lr is not an arm's
    assert len(pd.read_csv(mad_report.out_dir / "summary.csv")) == 8
    assert len(pd.read_csv(mad_report.out_dir / "trials.csv")) == 34  # every trial, every lr
    md = mad_report.markdown
    assert "One row per arm at its best learning rate (every learning rate: trials.csv and lr.png), grouped by " \
           "setting, best mean first within each" in md
    assert "| copy | 1 | `model.layout=M+F, variant=copy, optim.lr=0.001` |" in md
    assert "| copy | 3 | `model.layout=A+F, variant=copy, optim.lr=0.001` |" in md
    assert md.count("non-finite loss") == 2  # both failures listed under "Failed trials"
    assert "Files: summary.csv, trials.csv, arms.csv, score.csv (see analysis/report.py)." in md
    assert mad_report.skipped["pareto"] == "its points would mix task settings, whose values do not compare " \
                                           "with one another"
    assert mad_report.figures["ablation"].stat().st_size > 5000


def test_the_score_is_called_mad_score_for_the_mad_study_only(mad_report):
    assert [score_name(StudyMeta(name, "")) for name in ("mad", "mad.v2", "recall-suite")] == [
        "MAD score", "MAD score", "score over settings"]
    headers, _, _ = score_cells(mad_report.score, StudyMeta("recall-suite", "", metric="val/loss"))
    assert headers[1] == "score over settings (val/loss)"
    assert "MAD score (per architecture, over settings):" in mad_report.text
    assert "best recall: `model.layout=A+F` val/accuracy 0.93 [0.9, 0.96] at lr 0.001" in mad_report.text


def test_the_score_needs_no_lr_grid_and_counts_settings_no_trial_reached():
    storage = optuna.storages.InMemoryStorage()
    _settings_study(storage, "suite", lr_grid=None)  # lr varied as a plain search dimension
    df, (_, meta) = study_frame(storage, "suite"), load_study(storage, "suite")
    assert meta.setting_choices == SETTINGS
    arms = arms_frame(df, meta)
    score = score_frame(at_best(df, arms), arms, all_settings(df, meta), meta).set_index("architecture")
    assert score.loc["model.layout=A+F", "mean"] == pytest.approx((0.93 + 0.35 + 0.55) / 3)
    assert score.loc["model.layout=M+F", ["settings", "of"]].tolist() == [2, 3]
    meta.setting_choices = None  # a study that records no space: the settings its trials name
    assert all_settings(df, meta) == SETTINGS
    assert all_settings(df.drop(columns="variant"), meta) == []


def test_a_dimension_named_arm_keeps_its_settings_apart():
    """shared-attention-icl names its arm dimension `arm`, like the trials' arm label: each (arm, setting) stays
    its own arm, not one arm pooled over the settings."""
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(study_name="icl", storage=storage, direction="maximize")
    for key, value in {"metric": "val/accuracy", "direction": "maximize", "kind": "ablation",
                       "group_by": ["arm", "variant"], "arm_by": ["arm", "variant"],
                       "settings": {"space.variant.choices": json.dumps(SETTINGS)}}.items():
        study.set_user_attr(key, value)
    distributions = {"arm": CategoricalDistribution(["mamba", "shared"]), "variant": CategoricalDistribution(SETTINGS)}
    for i, (arm, setting) in enumerate((a, s) for a in ("mamba", "shared") for s in SETTINGS):
        study.add_trial(create_trial(params={"arm": arm, "variant": setting}, distributions=distributions,
                                     value=i / 10, user_attrs={"arm": f"arm={arm}, variant={setting}"}))
    df, (_, meta) = study_frame(storage, "icl"), load_study(storage, "icl")
    arms = arms_frame(df, meta)
    assert len(arms) == 6 and sorted(set(arms["setting"])) == sorted(SETTINGS)
    assert arms.set_index("arm").loc["arm=shared, variant=copy", "mean"] == pytest.approx(0.4)
