"""`write_report`: a study's tables (CSV, Markdown, terminal) and figures, logged to its MLflow parent run.

    runs/reports/<study>/
        summary.md     question, metric, trial counts, best configuration, the tables, the figures
        summary.csv    one row per configuration (seeds pooled), best first; with an lr (or wd) grid, one row
                       per arm at its best grid point (every grid point: trials.csv and lr.png)
        arms.csv       one row per arm (its best learning rate), best first; see analysis.arms
        score.csv      with task settings: one row per architecture, its mean over settings; see analysis.score
        variance.csv   with 2+ arm dimensions in a full grid: the share of variance each explains (analysis.variance)
        trials.csv     one row per trial
        *.png          the figures the data supports (see `FIGURES`)

A study with task settings (a `variant` param: MAD's tasks, Zoology's sequence lengths) ranks and compares its
arms within each setting only, and its configurations table groups rows by setting.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pandas as pd

from analysis import arms, figures, score, variance
from analysis.companions import join
from analysis.curves import trial_curves
from analysis.frames import NOT_TABULATED, ReportError, StudyMeta, load_study, summary_frame, trials_frame
from analysis.tables import fmt_number, markdown_table, table_cells, text_table
from hybrids.training.files import check_writable

log = logging.getLogger("hybrids")

# name -> (file, title); which of them a study gets, and in what order, depends on its kind (see `_plan`).
FIGURES = {
    "spacing": ("spacing.png", "Objective vs attention invocations"),
    "lr": ("lr.png", "Objective vs learning rate per arm"),
    "ablation": ("ablation.png", "Objective per configuration"),
    "curves": ("curves.png", "Loss and learning-rate curves"),
    "importance": ("importance.png", "Parameter importance"),
    "pareto": ("pareto.png", "Quality vs KV cache and parameters (Pareto front)"),
}
PLANS = {
    "spacing": ("spacing", "lr", "pareto", "curves", "importance"),
    "ablation": ("ablation", "lr", "pareto", "curves", "importance"),
    "schedule": ("curves", "ablation", "lr", "importance"),
    "generic": ("ablation", "lr", "pareto", "curves", "importance"),
}


@dataclass
class ReportResult:
    """What `write_report` wrote.

    Attributes:
        out_dir: the report's folder.
        files: every file written (tables first, then figures).
        figures: figure name -> PNG path, for the figures drawn.
        skipped: figure name -> why it was not drawn.
        text: the terminal rendering (header and aligned table).
        markdown: the content of summary.md.
        summary: the per-configuration frame (as in summary.csv).
        best: the best configuration's summary row as a dict, or None without a complete trial.
        mlflow_run_id: the parent run the files were logged to, or None.
        notes: anything the reader should know (e.g. why nothing was logged to MLflow).
        arms: one row per arm at its best learning rate (as in arms.csv; see analysis.arms), or None.
        statements: the report's sentences on the comparison (budget matching, grid edges, differences).
        score: with task settings, one row per architecture over the settings (as in score.csv), or None.
    """

    out_dir: Path
    files: list[Path]
    figures: dict[str, Path]
    skipped: dict[str, str]
    text: str
    markdown: str
    summary: pd.DataFrame
    best: dict | None
    mlflow_run_id: str | None = None
    notes: list[str] = field(default_factory=list)
    arms: pd.DataFrame | None = None
    statements: list[str] = field(default_factory=list)
    score: pd.DataFrame | None = None


def _counts(df: pd.DataFrame) -> dict[str, int]:
    states = df["state"].value_counts() if len(df) else pd.Series(dtype=int)
    counts = {"complete": int(states.get("COMPLETE", 0)), "pruned": int(states.get("PRUNED", 0)),
              "failed": int(states.get("FAIL", 0))}
    counts["other"] = len(df) - sum(counts.values())  # RUNNING or WAITING: a study still in progress
    return counts


def _counts_text(counts: dict[str, int]) -> str:
    text = f"{counts['complete']} complete, {counts['pruned']} pruned, {counts['failed']} failed"
    return text + (f", {counts['other']} running or waiting" if counts["other"] else "")


def _best_text(best: dict | None, meta: StudyMeta) -> str:
    if best is None:
        return "none (no complete trial)"
    spread = "" if pd.isna(best["std"]) else f" ± {fmt_number(best['std'], 2)}"
    seeds = f"{best['n']} seed" + ("s" if best["n"] != 1 else "")
    trial = "" if pd.isna(best.get("best_trial")) else f"; best trial #{int(best['best_trial'])}"
    return f"{best['group']}: {meta.metric} {fmt_number(best['mean'])}{spread} over {seeds}{trial}"


def _bests(best: dict | None, arms_df: pd.DataFrame, settings: bool) -> dict[str, tuple[str, float]]:
    """setting ("" without settings) -> (its best configuration or arm, its mean): what MLflow records."""
    if settings:
        return {r["setting"]: (r["architecture"], r["mean"]) for _, r in arms.best_per_setting(arms_df).iterrows()}
    return {} if best is None else {"": (str(best["group"]), best["mean"])}


def _best_per_setting(arms_df: pd.DataFrame, meta: StudyMeta) -> list[str]:
    return [f"{r['setting']}: `{r['architecture']}` {meta.metric} {fmt_number(r['mean'])} "
            f"[{fmt_number(r['min'], 3)}, {fmt_number(r['max'], 3)}] at lr {fmt_number(r['best_lr'], 3)}"
            for _, r in arms.best_per_setting(arms_df).iterrows()]


def _not_across_settings(path: Path) -> Path:
    raise figures.FigureSkipped("its points would mix task settings, whose values do not compare with one another")


def _plan(meta: StudyMeta, study: optuna.Study, df: pd.DataFrame, shown: pd.DataFrame, summary: pd.DataFrame,
          points: pd.DataFrame, arms_df: pd.DataFrame, settings: bool) -> dict[str, Callable]:
    """Draw functions by figure name; `shown` (the trials behind `summary`) for the figures of configurations,
    `df` (every trial) for those of learning rates and importance."""
    draw = {
        "lr": lambda path: arms.lr_figure(points, arms_df, meta, path),
        "spacing": lambda path: figures.spacing(shown, summary, meta, path),
        "ablation": lambda path: figures.ablation(shown, summary, meta, path),
        "curves": lambda path: figures.curves(shown, summary, meta, trial_curves(shown), path),
        "importance": lambda path: figures.importance(study, df, meta, path),
        "pareto": lambda path: figures.pareto(shown, summary, meta, path),
    }
    if settings:
        draw.update(spacing=_not_across_settings, pareto=_not_across_settings)
    return {name: draw[name] for name in PLANS[meta.kind]}


def _draw(plan: dict[str, Callable], out_dir: Path) -> tuple[dict[str, Path], dict[str, str]]:
    drawn, skipped = {}, {}
    for name, draw in plan.items():
        path = out_dir / FIGURES[name][0]
        path.unlink(missing_ok=True)  # a figure a re-run skips must not survive from an earlier run
        try:
            drawn[name] = draw(path)
        except figures.FigureSkipped as why:
            skipped[name] = str(why)
        except Exception as err:  # one unexpected figure must not cost the user the whole report
            log.warning("report: figure %s failed: %r", name, err)
            skipped[name] = f"failed: {type(err).__name__}: {err}"
    return drawn, skipped


def _failures(df: pd.DataFrame) -> list[str]:
    """One Markdown line per failed trial, with the reason the sweep recorded (e.g. a non-finite loss)."""
    failed = df[df["state"] == "FAIL"] if len(df) else df
    reasons = failed["fail_reason"] if "fail_reason" in failed.columns else pd.Series(None, index=failed.index)
    return [f"- trial {n} (`{config}`): {reason if isinstance(reason, str) else 'no reason recorded'}"
            for n, config, reason in zip(failed["number"], failed["config"], reasons, strict=True)]


def _configurations_text(per_arm: bool, settings: bool) -> str:
    rows = ("One row per arm at its best learning rate (every learning rate: trials.csv and lr.png)" if per_arm
            else "One row per configuration")
    order = "grouped by setting, best mean first within each" if settings else "best mean first"
    return f"{rows}, {order}; mean ± std (sample std) over the seeds' complete trials."


def _markdown(meta: StudyMeta, counts: dict, best_md: list[str], table: list[str], drawn: dict, skipped: dict,
              failures: list[str], comparison_md: list[str], csvs: list[str]) -> str:
    lines = [f"# Study report: {meta.name}", ""]
    if meta.question:
        lines += [f"**Question:** {meta.question}", ""]
    lines += [f"**Metric:** `{meta.metric}` ({meta.direction}) · kind: {meta.kind} · storage: `{meta.storage}`", "",
              f"**Trials:** {_counts_text(counts)} ({sum(counts.values())} total)", "",
              *best_md, *comparison_md, "## Configurations", "", *table, ""]
    if drawn:
        lines += ["## Figures", ""]
        for name, path in drawn.items():
            lines += [f"### {FIGURES[name][1]}", "", f"![{name}]({path.name})", ""]
    if failures:
        lines += ["## Failed trials", "", *failures, ""]
    if skipped:
        lines += ["## Figures not drawn", ""]
        lines += [f"- {FIGURES[name][1]} ({FIGURES[name][0]}): {why}" for name, why in skipped.items()]
        lines.append("")
    lines += [f"Files: {', '.join(csvs)} (see analysis/report.py)."]
    return "\n".join(lines) + "\n"


def _log_to_mlflow(meta: StudyMeta, files: list[Path], bests: dict[str, tuple[str, float]]) \
        -> tuple[str | None, str | None]:
    """Log the report's files under "report/" of the study's parent run, and each setting's best (see `_bests`)
    as metric best/<metric>[/<setting>] and tag report.best_configuration[.<setting>]; returns (run id, note)."""
    run_id, uri = meta.mlflow_parent_run_id, meta.tracking_uri
    if not run_id or not uri:
        return None, "not logged to MLflow: the study records no mlflow_parent_run_id / tracking_uri"
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None, f"not logged to MLflow: no tracking store at {uri}"
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri)
    try:
        for path in files:
            client.log_artifact(run_id, str(path), artifact_path="report")
        for setting, (label, mean) in bests.items():
            client.log_metric(run_id, f"best/{meta.metric}" + (f"/{setting}" if setting else ""), float(mean))
            client.set_tag(run_id, "report.best_configuration" + (f".{setting}" if setting else ""), label)
    except (MlflowException, OSError) as err:
        log.warning("report: MLflow logging failed: %s", err)
        return None, f"not logged to MLflow run {run_id}: {err}"
    return run_id, None


def _folder(meta: StudyMeta) -> str:
    """`<study>-<uid>`: a same-named study in another storage gets its own folder."""
    name = meta.name.replace(os.sep, "_")
    return f"{name}-{meta.uid}" if meta.uid else name


def _claim(out_dir: Path, meta: StudyMeta) -> Path:
    """Create the report folder and mark it as this study's; refuse a folder that holds another study's report.

    Raises:
        ReportError: when `out_dir` holds the report of a different study.
    """
    marker = out_dir / "study.json"
    mine = {"study": meta.name, "storage": meta.storage, "uid": meta.uid}
    if marker.is_file():
        theirs = json.loads(marker.read_text())
        if theirs.get("uid") != meta.uid or (meta.uid is None and theirs != mine):
            raise ReportError(f"{out_dir} holds the report of another study ({theirs.get('study')} in "
                              f"{theirs.get('storage')}, uid {theirs.get('uid')}); choose another out=")
    elif out_dir.is_dir() and any(out_dir.iterdir()):
        raise ReportError(f"{out_dir} is not empty and holds no study report; choose another out=")
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(mine) + "\n")
    return out_dir


def write_report(storage, study_name: str, out_dir: str | Path | None = None,
                 log_to_mlflow: bool = True, echo: bool = True, companions: list[str] | None = None) -> ReportResult:
    """Write the tables and figures of a study, and log them to the study's MLflow parent run.

    Args:
        storage: the Optuna storage: an RDB URL such as sqlite:///runs/optuna.db, "journal:<path>" or the path
            of a journal file (see `open_storage`).
        study_name: the study's name.
        out_dir: the report's folder; default runs/reports/<study>-<uid>/ (the study's own id, so that a
            same-named study in another storage never overwrites it). A folder that holds another study's
            report is refused.
        log_to_mlflow: log every file under "report/" of the parent run, and the best mean as metric
            "best/<metric>" (with task settings, each setting's as "best/<metric>/<setting>"), when the study
            records mlflow_parent_run_id and tracking_uri.
        echo: print the terminal table.
        companions: studies in the same storage whose trials join as further arms (analysis.companions).
    Returns:
        A `ReportResult`: the files written, the figures drawn or skipped (with why) and the terminal text.
    Raises:
        ReportError: for a missing storage or an unknown study.
    """
    study, meta = load_study(storage, study_name)
    df, meta = join(storage, study, meta, trials_frame(study, meta), list(companions or []))
    points = arms.arm_points(df)
    arms_df = arms.arms_frame(df, meta)
    per_arm = bool(meta.lr_grid or meta.wd_grid) and len(arms_df) > 0
    best_trials = arms.at_best(df, arms_df)
    shown = best_trials if per_arm else df  # the trials behind the configurations table
    settings = arms.setting_key(df) is not None and len(arms_df) > 0
    summary = summary_frame(shown)
    if settings:
        summary = arms.by_setting(summary, arms_df)
    out_dir = Path(out_dir) if out_dir is not None else Path("runs") / "reports" / _folder(meta)
    check_writable(out_dir, "report folder")
    out_dir = _claim(out_dir, meta)
    tables = [out_dir / "summary.csv", out_dir / "trials.csv", out_dir / "summary.md"]
    summary.to_csv(tables[0], index=False)
    df.drop(columns=[c for c in NOT_TABULATED if c in df.columns]).to_csv(tables[1], index=False)

    counts = _counts(df)
    scored = summary[summary["n"] > 0] if len(summary) else summary
    best = scored.iloc[0].to_dict() if len(scored) else None
    headers, rows, numeric = table_cells(summary, meta.metric)
    said = arms.statements(arms_df, meta) if len(arms_df) else []
    arms_table = arms.arms_cells(arms_df, meta) if len(arms_df) else None
    if arms_table is not None:
        tables.append(out_dir / "arms.csv")
        arms_df.to_csv(tables[-1], index=False)
    scores = score.score_frame(best_trials, arms_df, score.all_settings(df, meta), meta) if settings else None
    score_table = score.score_cells(scores, meta) if settings else None
    score_said = score.score_statements(scores, meta) if settings else []
    if settings:
        tables.append(out_dir / "score.csv")
        scores.to_csv(tables[-1], index=False)
    decomposition, _ = variance.study_variance(best_trials, arms.arm_by(df))
    if decomposition is not None:
        tables.append(out_dir / "variance.csv")
        decomposition.to_csv(tables[-1], index=False)
    drawn, skipped = _draw(_plan(meta, study, df, shown, summary, points, arms_df, settings), out_dir)
    comparison_md = [] if arms_table is None else [
        "## Arms", "", "Each arm at its best learning rate: the mean over seeds there, and the range (min to max) "
        "over those seeds, the spread used to call two arms different (see analysis/arms.py)"
        + ("; ranked and compared within each setting only." if settings else "."), "",
        markdown_table(*arms_table), "", *(f"- {line}" for line in said), ""]
    if score_table is not None:
        comparison_md += [
            f"## {score.score_name(meta)[0].upper()}{score.score_name(meta)[1:]}", "",
            "One row per architecture (an arm without its setting): the mean over settings of its value at each "
            "setting's best learning rate. Range over seeds: a seed's score is the mean over settings of its "
            "values at those learning rates. A score over k of n settings is partial (see analysis/score.py).", "",
            markdown_table(*score_table), "", *(f"- {line}" for line in score_said), ""]
    if decomposition is not None:
        comparison_md += [
            "## Variance explained", "", "How much of the variance of the trials (each arm at its best learning "
            "rate) each arm dimension and interaction explains: a balanced-ANOVA decomposition over the full grid "
            "(see analysis/variance.py).", "", markdown_table(*variance.variance_cells(decomposition, meta.metric)),
            ""]
    best_md = ["**Best arm per setting** (settings are not compared with one another):", "",
               *(f"- {line}" for line in _best_per_setting(arms_df, meta)), ""] if settings else \
        [f"**Best configuration:** {_best_text(best, meta)}", ""]
    table_md = [_configurations_text(per_arm, settings), "", markdown_table(headers, rows, numeric)]
    markdown = _markdown(meta, counts, best_md, table_md, drawn, skipped, _failures(df), comparison_md,
                         [path.name for path in tables if path.suffix == ".csv"])
    tables[2].write_text(markdown)
    files = [*tables, *drawn.values()]

    notes = []
    run_id = None
    if log_to_mlflow:
        run_id, note = _log_to_mlflow(meta, files, _bests(best, arms_df, settings))
        notes += [note] if note else []
    lines = [f"{meta.name}" + (f" - {meta.question}" if meta.question else ""),
             f"metric {meta.metric} ({meta.direction}); trials: {_counts_text(counts)}"]
    lines += [f"best {line}" for line in _best_per_setting(arms_df, meta)] if settings else \
        [f"best: {_best_text(best, meta)}"]
    lines += ["", text_table(headers, rows, numeric), ""]
    if arms_table is not None:
        lines += ["arms (each at its best learning rate):", text_table(*arms_table), *said, ""]
    if score_table is not None:
        lines += [f"{score.score_name(meta)} (per architecture, over settings):", text_table(*score_table),
                  *score_said, ""]
    if decomposition is not None:
        lines += ["variance explained (over the arms' best learning rates):",
                  text_table(*variance.variance_cells(decomposition, meta.metric)), ""]
    lines += [f"figures: {', '.join(p.name for p in drawn.values()) or 'none'}"]
    lines += [f"skipped {FIGURES[name][0]}: {why}" for name, why in skipped.items()]
    lines += [f"report: {out_dir}/" + (f"  (logged to MLflow run {run_id} under report/)" if run_id else "")]
    lines += notes
    if meta.versions:
        lines += [f"other versions of this study in the storage: {', '.join(meta.versions)} (report one with "
                  f"study=<name>)"]
    text = "\n".join(lines)
    if echo:
        print(text)
    return ReportResult(out_dir, files, drawn, skipped, text, markdown, summary, best, run_id, notes,
                        arms_df if arms_table is not None else None, said, scores)
