"""The score over task settings: one number per architecture for a study whose arms run on several settings.

MAD's protocol (athms/mad-lab): each architecture trains on every task setting at every grid point, keeps its
best grid point per setting, and its MAD score is the mean over settings of the value there. The same holds for
any study with settings (analysis.arms.SETTING): an architecture is an arm without its setting.

The spread is over seeds, as for an arm: seed s's score is the mean over settings of seed s's value at each
setting's best grid point (chosen on the mean over seeds), and the range is min to max over the seeds that have
a value in every setting the architecture covers. An architecture with a complete grid point in only k of the
study's n settings gets a partial score (k/n settings): a mean over other tasks, not comparable with a full one.
"""

from __future__ import annotations

import pandas as pd

from analysis.arms import compare, setting_key
from analysis.figures import _complete
from analysis.frames import StudyMeta
from analysis.tables import fmt_number
from search.identity import base_name
from search.protocol import SEED

COLUMNS = ["architecture", "mean", "min", "max", "n", "settings", "of"]


def score_name(meta: StudyMeta) -> str:
    """"MAD score" for the `mad` study (any version), else "score over settings"."""
    return "MAD score" if base_name(meta.name) == "mad" else "score over settings"


def all_settings(df: pd.DataFrame, meta: StudyMeta) -> list[str]:
    """The study's settings: the choices its space records (so that a setting no trial reached yet counts), else
    the settings its trials name."""
    if meta.setting_choices:
        return [str(choice) for choice in meta.setting_choices]
    key = setting_key(df)
    return [] if key is None else [str(v) for v in df[key].dropna().unique()]


def score_frame(best_trials: pd.DataFrame, arms: pd.DataFrame, settings: list[str], meta: StudyMeta) -> pd.DataFrame:
    """One row per architecture: the mean over the settings it covers of its arm values, and the range over seeds.

    Args:
        best_trials: the trials at their arm's best grid point (analysis.arms.at_best), with columns value,
            state, architecture, setting and the seed (param trainer.seed, else attr seed).
        arms: analysis.arms.arms_frame (its mean per arm at the best grid point).
        settings: every setting of the study (see `all_settings`).
        meta: the study's metadata (direction).
    Returns:
        Columns architecture, mean (over settings), min and max (over seeds of the per-seed score), n (seeds with
        a value in every covered setting), settings (k covered), of (n in the study); full coverage first, then
        best mean first.
    """
    done = _complete(best_trials)
    seed = SEED if SEED in done.columns else "seed" if "seed" in done.columns else None
    rows = []
    for architecture, part in arms.groupby("architecture", sort=False):
        covered = part["setting"].unique().tolist()
        trials = done[done["architecture"] == architecture]
        per_seed = trials.pivot_table(index=trials[seed] if seed else pd.Series(0, index=trials.index),
                                      columns="setting", values="value", aggfunc="mean")
        scores = per_seed.reindex(columns=covered).dropna().mean(axis=1)
        rows.append({"architecture": architecture, "mean": part["mean"].mean(), "min": scores.min(),
                     "max": scores.max(), "n": len(scores), "settings": len(covered),
                     "of": max(len(settings), len(covered))})
    frame = pd.DataFrame(rows, columns=COLUMNS)
    key = frame["mean"] if meta.direction == "maximize" else -frame["mean"]
    frame = frame.assign(_full=frame["settings"] == frame["of"], _key=key)
    frame = frame.sort_values(["_full", "_key"], ascending=False, kind="stable")
    return frame.drop(columns=["_full", "_key"]).reset_index(drop=True)


def _coverage(row) -> str:
    return f"{row['settings']}/{row['of']}" + ("" if row["settings"] == row["of"] else " (partial)")


def score_cells(score: pd.DataFrame, meta: StudyMeta) -> tuple[list[str], list[list[str]], list[bool]]:
    """Headers, cells and numeric flags of the score table (analysis.tables renders them)."""
    headers = ["architecture", f"{score_name(meta)} ({meta.metric})", "range over seeds", "seeds", "settings"]
    rows = [[str(r["architecture"]), fmt_number(r["mean"]),
             f"[{fmt_number(r['min'], 3)}, {fmt_number(r['max'], 3)}]", str(r["n"]), _coverage(r)]
            for _, r in score.iterrows()]
    return headers, rows, [False, True, True, True, True]


def score_statements(score: pd.DataFrame, meta: StudyMeta) -> list[str]:
    """The best full-coverage architecture against each other one (ranges over seeds), and which are partial."""
    name = score_name(meta)
    full = score[score["settings"] == score["of"]]
    lines = [compare(full.iloc[0], other, "architecture", f"no difference in {name}")
             for _, other in full.iloc[1:].iterrows()]
    partial = score[score["settings"] < score["of"]]
    if len(partial):
        lines.append(f"partial {name} (not comparable with a full one): " + ", ".join(
            f"{r['architecture']} over {r['settings']}/{r['of']} settings" for _, r in partial.iterrows()))
    return lines
