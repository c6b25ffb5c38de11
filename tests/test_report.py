"""Study reports from a synthetic Optuna study: summary numbers, tables, figures, MLflow artifacts, edge cases."""

import statistics

import numpy as np
import optuna
import pandas as pd
import pytest
from mlflow import MlflowClient
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from analysis import ReportError, study_frame, summary_frame, write_report
from analysis.curves import read_metrics
from analysis.figures import pareto_front

optuna.logging.set_verbosity(optuna.logging.WARNING)

# layout -> (n_invocations, params_unique, kv_bytes, accuracy of seed 0 and seed 1)
LAYOUTS = {
    "4M": (0, 1000, 0, (0.50, 0.54)),
    "2M:A*:2M": (1, 1200, 4096, (0.80, 0.86)),
    "(M:A*)x3:M": (3, 1200, 12288, (0.90, 0.94)),
    "4A": (0, 1100, 16384, (0.88, 0.90)),
}
DISTRIBUTIONS = {"model.layout": CategoricalDistribution(list(LAYOUTS)), "trainer.seed": IntDistribution(0, 3)}
QUESTION = "How many attention invocations does a Mamba backbone need?"


def write_metrics(run_dir, version, steps, loss, lr, val_every=50):
    """A Lightning-style sparse metrics.csv: train rows every step, val rows every `val_every` steps."""
    rows = []
    for step in steps:
        rows.append({"step": step, "epoch": 0, "train/loss": loss(step), "lr": lr(step)})
        if (step + 1) % val_every == 0:
            rows.append({"step": step, "epoch": 0, "val/loss": loss(step) + 0.1, "val/accuracy": 0.5})
    path = run_dir / "csv" / f"version_{version}"
    path.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path / "metrics.csv", index=False)


def attrs(tmp_path, layout, seed, accuracy):
    n_invocations, params, kv_bytes, _ = LAYOUTS[layout]
    run_dir = tmp_path / "train" / f"{layout.replace('*', 's').replace(':', '_')}-s{seed}"
    speed = 0.03 * accuracy**4
    write_metrics(run_dir, 0, range(100), lambda s: 4.0 * np.exp(-speed * s) + 0.2 + 0.05 * seed,
                  lambda s: 1e-3 * min(1.0, (s + 1) / 10))
    return {"run_dir": str(run_dir), "mlflow_run_id": f"child-{layout}-{seed}", "config_yaml": "model: {}\n",
            "layout": layout, "n_layers": 4, "n_invocations": n_invocations, "params_unique": params,
            "flops_per_token": 2 * params, "kv_bytes": kv_bytes, "state_bytes": 256, "seed": seed,
            "group": f"layout={layout}",
            "metrics": {"val/accuracy": accuracy, "val/loss": 1.0 - accuracy + 0.01 * seed}}


def make_study(storage, name, kind="spacing", mlflow=None):
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    user_attrs = {"metric": "val/accuracy", "direction": "maximize", "question": QUESTION,
                  "group_by": ["model.layout"], "x": "n_invocations", "kind": kind}
    if mlflow is not None:
        user_attrs.update(mlflow_parent_run_id=mlflow[0], tracking_uri=mlflow[1])
    for key, value in user_attrs.items():
        study.set_user_attr(key, value)
    return study


def add(study, layout, seed, state=TrialState.COMPLETE, value=None, user_attrs=None):
    study.add_trial(create_trial(params={"model.layout": layout, "trainer.seed": seed}, distributions=DISTRIBUTIONS,
                                 value=value, user_attrs=user_attrs or {}, state=state))


@pytest.fixture(scope="module")
def spacing_study(tmp_path_factory):
    """4 layouts x 2 seeds, one pruned and one failed trial, and an MLflow parent run (built once: MLflow's
    store takes seconds to create)."""
    tmp_path = tmp_path_factory.mktemp("spacing")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("attention-spacing", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(exp, run_name="study").info.run_id
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = make_study(storage, "attention-spacing", mlflow=(parent, uri))
    for layout, (*_, accuracies) in LAYOUTS.items():
        for seed, accuracy in enumerate(accuracies):
            add(study, layout, seed, value=accuracy, user_attrs=attrs(tmp_path, layout, seed, accuracy))
    add(study, "4A", 2, state=TrialState.PRUNED, user_attrs=attrs(tmp_path, "4A", 2, 0.3))
    add(study, "4M", 2, state=TrialState.FAIL, user_attrs={"fail_reason": "non-finite loss at step 7"})
    return storage, parent, client


def test_study_frame_has_a_row_per_trial(spacing_study):
    storage, *_ = spacing_study
    df = study_frame(storage, "attention-spacing")
    assert len(df) == 10
    assert df["state"].value_counts().to_dict() == {"COMPLETE": 8, "PRUNED": 1, "FAIL": 1}
    first = df[df["number"] == 0].iloc[0]
    assert first["model.layout"] == "4M" and first["trainer.seed"] == 0 and first["value"] == 0.50
    assert first["metric:val/accuracy"] == 0.50 and first["metric:val/loss"] == pytest.approx(0.50)
    assert first["n_invocations"] == 0 and first["kv_bytes"] == 0 and first["group"] == "layout=4M"
    assert first["duration_s"] >= 0 and first["config"] == "layout=4M"
    assert df.attrs["direction"] == "maximize" and df.attrs["group_by"] == ["model.layout"]


def test_summary_pools_seeds_per_configuration(spacing_study):
    storage, *_ = spacing_study
    summary = summary_frame(study_frame(storage, "attention-spacing"))
    assert list(summary["layout"]) == ["(M:A*)x3:M", "4A", "2M:A*:2M", "4M"]  # best mean first
    for _, row in summary.iterrows():
        accuracies = LAYOUTS[row["layout"]][3]
        assert row["n"] == 2 and row["group"] == f"layout={row['layout']}"
        assert row["mean"] == pytest.approx(statistics.mean(accuracies))
        assert row["std"] == pytest.approx(statistics.stdev(accuracies))
        assert (row["min"], row["max"]) == (min(accuracies), max(accuracies))
        losses = [1.0 - a + 0.01 * seed for seed, a in enumerate(accuracies)]
        assert row["val/loss mean"] == pytest.approx(statistics.mean(losses))
        assert row["kv_bytes"] == LAYOUTS[row["layout"]][2]
    by_layout = summary.set_index("layout")
    assert by_layout.loc["4M", "failed"] == 1 and by_layout.loc["4A", "pruned"] == 1
    assert by_layout.loc["4M", "family"] == "pure Mamba" and by_layout.loc["4A", "family"] == "pure transformer"
    assert by_layout.loc["(M:A*)x3:M", "best_trial"] == 5
    minimize = summary_frame(study_frame(storage, "attention-spacing"), direction="minimize")
    assert minimize["layout"].iloc[0] == "4M"


def test_pareto_front_keeps_undominated_points():
    costs = np.array([0, 4096, 12288, 16384, 4096])
    quality = np.array([0.52, 0.83, 0.92, 0.89, 0.60])
    assert pareto_front(costs, quality, maximize=True).tolist() == [0, 1, 2]
    assert pareto_front(costs, -quality, maximize=False).tolist() == [0, 1, 2]


def test_read_metrics_lets_a_later_attempt_win(tmp_path):
    write_metrics(tmp_path, 0, range(10), lambda s: 1.0, lambda s: 0.1, val_every=5)
    write_metrics(tmp_path, 1, range(5, 10), lambda s: 2.0, lambda s: 0.2, val_every=5)
    metrics = read_metrics(tmp_path)
    assert metrics.index.tolist() == list(range(10))
    assert metrics["train/loss"].tolist() == [1.0] * 5 + [2.0] * 5
    assert metrics["val/loss"].dropna().to_dict() == {4: 1.1, 9: 2.1}
    assert read_metrics(tmp_path / "missing") is None


def test_report_writes_tables_figures_and_logs_to_mlflow(spacing_study, tmp_path, capsys):
    storage, parent, client = spacing_study
    result = write_report(storage, "attention-spacing", out_dir=tmp_path / "report")
    names = {p.name for p in result.files}
    assert names == {"summary.csv", "trials.csv", "summary.md", "arms.csv", "spacing.png", "pareto.png",
                     "curves.png", "importance.png"}, result.skipped
    assert result.skipped == {"lr": "needs complete trials at 2 or more learning rates (set lr_grid)"}
    for name in ("spacing.png", "pareto.png", "curves.png", "importance.png"):
        assert (tmp_path / "report" / name).stat().st_size > 5000

    summary = pd.read_csv(tmp_path / "report" / "summary.csv")
    assert summary["mean"].tolist() == pytest.approx([0.92, 0.89, 0.83, 0.52])
    assert summary["std"].iloc[0] == pytest.approx(statistics.stdev([0.90, 0.94]))
    trials = pd.read_csv(tmp_path / "report" / "trials.csv")
    assert len(trials) == 10 and "config_yaml" not in trials.columns
    assert trials.set_index("number").loc[9, "state"] == "FAIL"

    md = (tmp_path / "report" / "summary.md").read_text()
    assert QUESTION in md and "**Trials:** 8 complete, 1 pruned, 1 failed (10 total)" in md
    assert "**Best configuration:** layout=(M:A*)x3:M: val/accuracy 0.92 ± 0.028 over 2 seeds; best trial #5" in md
    # rank, configuration, invocations, params, KV cache, seeds, mean ± std, min, max, pruned/failed, val/loss
    assert "| 1 | `layout=(M:A*)x3:M` | 3 | 1.2k | 12.0 KiB | 2 | 0.92 ± 0.028 | 0.9 | 0.94 | 0/0 | 0.085 |" in md
    assert "| 4 | `layout=4M` | 0 | 1k | 0 B | 2 | 0.52 ± 0.028 | 0.5 | 0.54 | 0/1 | 0.485 |" in md
    assert "![spacing](spacing.png)" in md
    assert "- trial 9 (`layout=4M`): non-finite loss at step 7" in md

    out = capsys.readouterr().out
    assert out.strip() == result.text.strip()
    table = result.text.splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("rank"))
    assert table[header + 2].split()[:3] == ["1", "layout=(M:A*)x3:M", "3"]
    assert len({len(line) for line in table[header:header + 2]}) == 1  # header and rule aligned

    assert result.mlflow_run_id == parent
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert logged == {f"report/{name}" for name in names}
    assert client.get_run(parent).data.metrics["best/val/accuracy"] == pytest.approx(0.92)


@pytest.mark.parametrize("kind, main", [("ablation", "ablation.png"), ("schedule", "curves.png")])
def test_kind_chooses_the_figures(tmp_path, kind, main):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = make_study(storage, "s", kind=kind)
    for layout in ("4M", "4A"):
        for seed, accuracy in enumerate(LAYOUTS[layout][3]):
            add(study, layout, seed, value=accuracy, user_attrs=attrs(tmp_path, layout, seed, accuracy))
    result = write_report(storage, "s", out_dir=tmp_path / "report", echo=False)
    assert result.files[4].name == main and (tmp_path / "report" / main).stat().st_size > 5000
    assert "spacing" not in result.figures
    assert result.notes == ["not logged to MLflow: the study records no mlflow_parent_run_id / tracking_uri"]


def test_one_trial_study_reports_without_crashing(tmp_path):
    journal = tmp_path / "journal.log"
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    study = make_study(storage, "tiny")
    add(study, "4M", 0, value=0.5, user_attrs=attrs(tmp_path, "4M", 0, 0.5))
    result = write_report(str(journal), "tiny", out_dir=tmp_path / "report", echo=False)
    assert result.best["mean"] == 0.5 and pd.isna(result.best["std"])
    assert set(result.figures) == {"curves"}
    assert set(result.skipped) == {"spacing", "lr", "pareto", "importance"}
    md = (tmp_path / "report" / "summary.md").read_text()
    assert "**Trials:** 1 complete, 0 pruned, 0 failed (1 total)" in md and "## Figures not drawn" in md
    assert "| 1 | `layout=4M` | 0 | 1k | 0 B | 1 | 0.5 | 0.5 | 0.5 | 0.5 |" in md


def test_a_study_still_in_progress_reports_its_finished_trials(tmp_path):
    storage = f"sqlite:///{tmp_path}/s.db"
    study = make_study(storage, "running")
    add(study, "4M", 0, value=0.5, user_attrs=attrs(tmp_path, "4M", 0, 0.5))
    study.enqueue_trial({"layout": "4A"})  # WAITING: no params yet (a NaN in the frame under pandas 3)
    result = write_report(storage, "running", out_dir=tmp_path / "report", echo=False)
    assert result.best["mean"] == 0.5 and "1 running or waiting" in result.markdown


def test_all_failed_study_reports_without_crashing(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = make_study(storage, "broken")
    add(study, "4M", 0, state=TrialState.FAIL)
    add(study, "4A", 0, state=TrialState.FAIL)
    result = write_report(storage, "broken", out_dir=tmp_path / "report", echo=False)
    assert result.best is None and result.figures == {}
    assert result.summary["failed"].tolist() == [1, 1] and result.summary["n"].tolist() == [0, 0]
    assert "**Best configuration:** none (no complete trial)" in result.markdown
    assert "- trial 1 (`layout=4A`): no reason recorded" in result.markdown


def test_unknown_study_or_storage_is_one_clear_error(spacing_study, tmp_path):
    storage, *_ = spacing_study
    with pytest.raises(ReportError, match="no study named 'nope'.*studies there: attention-spacing"):
        write_report(storage, "nope", out_dir=tmp_path / "r")
    with pytest.raises(ReportError, match="no Optuna storage"):
        write_report(f"sqlite:///{tmp_path}/missing.db", "x", out_dir=tmp_path / "r")
    assert not (tmp_path / "missing.db").exists()
