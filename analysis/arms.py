"""The arms of a comparison study: each arm's best learning rate, its value there, its budget, and what follows.

An arm is a configuration of the study's space without seed, learning rate and weight decay (search.protocol).
It trains at every point of the study's learning-rate (x weight-decay) grid and at every seed; its value is the
mean over seeds at its best grid point, chosen by the study's direction.

The spread is the range (min to max) over seeds at that point, not a standard deviation: studies run 2-3 seeds,
too few for a sample std to mean much, and the range is what the seeds actually did. Two arms differ only when
their ranges do not overlap; with one seed there is no spread, and the report says it cannot tell.

A study whose space has a `variant` param runs its arms on several task settings (MAD's six tasks, Zoology's
sequence lengths): a value on one task says nothing against a value on another, so arms are ranked and compared
within each setting only. The arm without its setting is its architecture (analysis.score averages over settings).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.figures import FigureSkipped, _colors, _complete, _new, _save, _ylabel
from analysis.frames import SETTING, StudyMeta
from analysis.tables import fmt_number, human_bytes, human_count, is_missing
from search.protocol import LR, NOT_ARM, WD

MATCH_TOLERANCE = 0.05  # arms within 5% of the reference's budget count as matched
MAX_NAMED = 4  # a sentence names at most this many arms, else counts them
# match.by -> (the trials frame's column, its name in the table)
BUDGETS = {"params": ("params_unique", "params"), "flops": ("flops_per_token", "FLOPs/token"),
           "state": ("cache_bytes", "state+KV bytes")}


def arm_by(df: pd.DataFrame) -> list[str]:
    """The params that define an arm: the study's record, else its group_by params without lr and weight decay."""
    recorded = [k for k in df.attrs.get("arm_by") or [] if k in df.columns]
    if recorded:
        return recorded
    return [k for k in df.attrs.get("group_by") or df.attrs.get("params", []) if k in df.columns and k not in NOT_ARM]


def setting_key(df: pd.DataFrame) -> str | None:
    """The param that splits the study's arms into task settings (`SETTING`), or None when they share one."""
    return SETTING if SETTING in arm_by(df) else None


def _text(value) -> str:
    """A param value as the sweep writes it: 64, not the 64.0 of a column that also holds a missing value."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _labels(df: pd.DataFrame, keys: list[str], named: str | None = None) -> pd.Series:
    """"key=value, ..." per trial; where the trials of one key combination agree on one `named` attr (the sweep's
    "arm" label), that attr, so that a failed trial without attrs gets the label of its arm's complete trials."""
    if not keys:
        return pd.Series("default", index=df.index, dtype=object)
    keyed = df[keys].map(_text).agg("\x1f".join, axis=1)
    labels = {}
    for key, part in df.groupby(keyed, sort=False):
        attr = part[named].dropna().unique() if named in part.columns else []
        labels[key] = attr[0] if len(attr) == 1 else ", ".join(
            f"{k}={v}" for k, v in zip(keys, key.split("\x1f"), strict=True))
    return keyed.map(labels)


def label_trials(df: pd.DataFrame) -> pd.DataFrame:
    """The trials frame plus each trial's arm, setting ("" when the study has none), architecture (the arm
    without its setting), lr and wd (NaN where the study does not vary them)."""
    keys, setting = arm_by(df), setting_key(df)
    label = "attr:arm" if "attr:arm" in df.columns else "arm"  # the sweep's label; attr:arm where a param is "arm"
    arm = df[label].astype(str) if not keys and label in df.columns and df[label].notna().all() else \
        _labels(df, keys, label)
    return df.assign(arm=arm, setting=df[setting].map(_text) if setting else "",
                     architecture=_labels(df, [k for k in keys if k != setting]) if setting else arm,
                     lr=pd.to_numeric(df[LR], errors="coerce") if LR in df.columns else np.nan,
                     wd=pd.to_numeric(df[WD], errors="coerce") if WD in df.columns else np.nan)


def arm_points(df: pd.DataFrame) -> pd.DataFrame:
    """One row per arm and grid point (lr, weight decay) with complete trials: mean, std, min, max and n over seeds.

    Args:
        df: a trials frame (analysis.frames.study_frame).
    Returns:
        Columns arm, setting, architecture (see `label_trials`), lr, wd (NaN where the study does not vary it),
        mean, std, min, max, n; plus the arm's accounting columns (layout, params_unique, flops_per_token,
        kv_bytes, cache_bytes, d_model) from its trials.
    """
    done = _complete(label_trials(df)) if len(df) else df
    if done.empty:
        return pd.DataFrame(columns=["arm", "setting", "architecture", "lr", "wd", "mean", "std", "min", "max", "n"])
    if {"kv_bytes", "state_bytes"} <= set(done.columns):
        done["cache_bytes"] = pd.to_numeric(done["kv_bytes"]) + pd.to_numeric(done["state_bytes"])
    rows = []
    for (arm, lr, wd), part in done.groupby(["arm", "lr", "wd"], sort=False, dropna=False):
        values = part["value"]
        row = {"arm": arm, "setting": part["setting"].iloc[0], "architecture": part["architecture"].iloc[0],
               "lr": lr, "wd": wd, "mean": values.mean(), "std": values.std(), "min": values.min(),
               "max": values.max(), "n": len(values)}
        for column in ("layout", "d_model", "params_unique", "flops_per_token", "kv_bytes", "cache_bytes"):
            if column in part.columns:
                row[column] = part[column].iloc[0]
        rows.append(row)
    return pd.DataFrame(rows)


def arms_frame(df: pd.DataFrame, meta: StudyMeta) -> pd.DataFrame:
    """One row per arm, grouped by setting (in the order the trials first reach them) and best first within
    each: its budget and deviation from the reference's, its best lr (and wd), the mean and range over seeds
    there, n seeds, and whether the best lr lies at the edge of the learning-rate grid.

    Args:
        df: a trials frame.
        meta: the study's metadata (direction, lr_grid, match_by, match_budget).
    Returns:
        Columns arm, setting, architecture, budget, deviation (budget / reference - 1; NaN when not matched),
        best_lr, best_wd, mean, std, min, max, n, edge (bool), lrs (learning rates the arm completed), points
        (lr x wd grid points with a complete trial), grid (the study's lr x wd grid size; NaN without lr_grid),
        kv_bytes (the KV cache at the trials' seq_len and batch 1, bf16; NaN without accounting).
    """
    points = arm_points(df)
    columns = ["arm", "setting", "architecture", "budget", "deviation", "best_lr", "best_wd", "mean", "std", "min",
               "max", "n", "edge", "lrs", "points", "grid", "kv_bytes"]
    if points.empty:
        return pd.DataFrame(columns=columns)
    maximize = meta.direction == "maximize"
    grid = sorted(meta.lr_grid or points["lr"].dropna().unique())
    grid_size = len(meta.lr_grid) * len(meta.wd_grid or [None]) if meta.lr_grid else np.nan
    budget_column = BUDGETS[meta.match_by or "params"][0]
    rows = []
    for arm, part in points.groupby("arm", sort=False):
        best = part.loc[part["mean"].idxmax() if maximize else part["mean"].idxmin()]
        budget = best.get(budget_column)
        deviation = (budget / meta.match_budget - 1) if meta.match_by and meta.match_budget and \
            not is_missing(budget) else np.nan
        edge = bool(grid) and not is_missing(best["lr"]) and best["lr"] in (grid[0], grid[-1])
        rows.append({"arm": arm, "setting": best["setting"], "architecture": best["architecture"],
                     "budget": budget, "deviation": deviation, "best_lr": best["lr"], "best_wd": best["wd"],
                     **{k: best[k] for k in ("mean", "std", "min", "max", "n")},
                     "edge": edge, "lrs": int(part["lr"].nunique()), "points": len(part), "grid": grid_size,
                     "kv_bytes": best.get("kv_bytes", np.nan)})
    arms = pd.DataFrame(rows, columns=columns)
    order = {setting: i for i, setting in enumerate(arms["setting"].unique())}
    arms = arms.assign(_order=arms["setting"].map(order), _key=arms["mean"] if maximize else -arms["mean"])
    arms = arms.sort_values(["_order", "_key"], ascending=[True, False], kind="stable")
    return arms.drop(columns=["_order", "_key"]).reset_index(drop=True)


def at_best(df: pd.DataFrame, arms: pd.DataFrame) -> pd.DataFrame:
    """The trials (every state) at their arm's best grid point, and every trial of an arm without one: the rows
    behind a table or figure that shows one row per arm, labelled as by `label_trials`."""
    labelled = label_trials(df) if len(df) else df.assign(arm=[], setting=[], architecture=[], lr=[], wd=[])
    best = arms.set_index("arm")[["best_lr", "best_wd"]]
    lr, wd = labelled["arm"].map(best["best_lr"]), labelled["arm"].map(best["best_wd"])

    def same(a: pd.Series, b: pd.Series) -> pd.Series:
        return (a == b) | (a.isna() & b.isna())

    keep = ~labelled["arm"].isin(best.index) | (same(labelled["lr"], lr) & same(labelled["wd"], wd))
    kept = labelled[keep].copy()
    kept.attrs = dict(df.attrs)
    return kept


def by_setting(summary: pd.DataFrame, arms: pd.DataFrame) -> pd.DataFrame:
    """A summary (one row per configuration) with a "setting" column, its rows grouped by setting in the arms'
    order (settings without a complete trial last), keeping the summary's order within each setting."""
    order = {setting: i for i, setting in enumerate(arms["setting"].unique())}
    setting = summary[SETTING].map(lambda v: "" if is_missing(v) else _text(v)) if SETTING in summary.columns \
        else pd.Series("", index=summary.index)
    grouped = summary.assign(setting=setting, _order=setting.map(order).fillna(len(order)))
    grouped = grouped.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)
    grouped.attrs = dict(summary.attrs)
    return grouped


def _unfinished(arms: pd.DataFrame) -> pd.Series:
    """Per arm, whether some of its lr x wd grid points have no complete trial (False without a recorded grid)."""
    return arms["points"] < arms["grid"]


def _range(row) -> str:
    return f"[{fmt_number(row['min'], 3)}, {fmt_number(row['max'], 3)}]"


def compare(best: pd.Series, other: pd.Series, label: str, same: str) -> str:
    """One sentence on two rows' ranges over seeds (columns min, max, n): `same` when they overlap (e.g.
    "no difference at this budget"), else which beats which; with one seed, that it cannot tell."""
    if best["n"] < 2 or other["n"] < 2:
        return f"{best[label]} vs {other[label]}: one seed, no spread; cannot tell a difference"
    if best["min"] <= other["max"] and other["min"] <= best["max"]:
        return f"{same}: {best[label]} {_range(best)} and {other[label]} {_range(other)} overlap over seeds"
    return f"{best[label]} {_range(best)} beats {other[label]} {_range(other)}: their ranges over seeds do not overlap"


def statements(arms: pd.DataFrame, meta: StudyMeta) -> list[str]:
    """What a reader must know about the comparison, one sentence each: budget matching, grid edges, and for the
    best arm against each other arm whether their ranges over seeds overlap ("no difference at this budget");
    with task settings, the comparisons are within each setting and start with its name."""
    lines = []
    if not meta.match_by:
        lines.append("The arms are not budget-matched (the study sets no `match`): a difference may come from "
                     "their size, not their architecture.")
    else:
        off = arms[arms["deviation"].abs() > MATCH_TOLERANCE]["arm"].tolist()
        worst = arms["deviation"].abs().max()
        if off:
            tail = f"; off by more than {MATCH_TOLERANCE:.0%}: {', '.join(off)}"
        else:
            tail = "" if is_missing(worst) else f"; every arm within {worst:.1%}"
        lines.append(f"Budgets matched by {meta.match_by} to the reference's "
                     f"{_budget_text(meta.match_budget, meta)}{tail}.")
    edge = arms[arms["edge"]]["arm"].tolist()
    if edge:
        named = ", ".join(edge) if len(edge) <= MAX_NAMED else \
            f"{len(edge)} of {len(arms)} (the table's \"lr at edge\" column)"
        lines.append(f"best lr at the grid's edge for arms {named}: widen lr_grid")
    unfinished = arms[_unfinished(arms)]
    if len(unfinished):
        named = ", ".join(f"{r['arm']} ({r['points']} of {int(r['grid'])})" for _, r in unfinished.iterrows()) \
            if len(unfinished) <= MAX_NAMED else \
            f"{len(unfinished)} of {len(arms)} (the table's \"grid points\" column)"
        lines.append(f"grid points not all finished for arms {named}: each shows the best of what finished, "
                     "which may change when the rest finish")
    for setting, part in arms.groupby("setting", sort=False):
        prefix = f"{setting}: " if setting else ""
        best = part.iloc[0]
        lines += [prefix + compare(best, other, "architecture", "no difference at this budget")
                  for _, other in part.iloc[1:].iterrows()]
    return lines


def best_per_setting(arms: pd.DataFrame) -> pd.DataFrame:
    """The first (best) arm of each setting, as `arms_frame` rows."""
    return arms.groupby("setting", sort=False).head(1).reset_index(drop=True)


def _budget_text(value, meta: StudyMeta) -> str:
    if is_missing(value):
        return "-"
    return human_bytes(value) if (meta.match_by or "params") == "state" else human_count(value)


def arms_cells(arms: pd.DataFrame, meta: StudyMeta) -> tuple[list[str], list[list[str]], list[bool]]:
    """Headers, cells and numeric flags of the arms table (analysis.tables renders them); with task settings,
    a first column names each row's setting and the arm column shows its architecture."""
    name = BUDGETS[meta.match_by or "params"][1]
    has_wd = arms["best_wd"].notna().any()
    settings = bool(arms["setting"].astype(bool).any())
    unfinished = bool(_unfinished(arms).any())
    headers = [*(["setting"] if settings else []), "arm", f"budget ({name})" if meta.match_by else name,
               "vs reference", "best lr", *(["best wd"] if has_wd else []), f"{meta.metric} mean",
               "range over seeds", "seeds", "lr at edge", *(["grid points"] if unfinished else []), "KV cache"]
    rows = []
    for _, r in arms.iterrows():
        rows.append([*([str(r["setting"])] if settings else []), str(r["architecture"]),
                     _budget_text(r["budget"], meta), "-" if is_missing(r["deviation"]) else f"{r['deviation']:+.1%}",
                     fmt_number(r["best_lr"], 3), *([fmt_number(r["best_wd"], 3)] if has_wd else []),
                     fmt_number(r["mean"]), _range(r), str(r["n"]), "yes: widen lr_grid" if r["edge"] else "no",
                     *([f"{r['points']} of {int(r['grid'])}"] if unfinished else []),
                     "-" if is_missing(r["kv_bytes"]) else human_bytes(r["kv_bytes"])])
    numeric = [*([False] if settings else []), False, True, True, True, *([True] if has_wd else []), True, True,
               True, False, *([True] if unfinished else []), True]
    return headers, rows, numeric


def lr_figure(points: pd.DataFrame, arms: pd.DataFrame, meta: StudyMeta, path: Path) -> Path:
    """The objective against the learning rate (log x), one line per arm (at each lr its best weight decay),
    error bars the range over seeds; each arm's best point ringed."""
    points = points.dropna(subset=["lr"]) if len(points) else points
    if points.empty or points["lr"].nunique() < 2:
        raise FigureSkipped("needs complete trials at 2 or more learning rates (set lr_grid)")
    maximize = meta.direction == "maximize"
    fig, (ax,) = _new(7.5, 4.8)
    for arm, color in zip(arms["arm"], _colors(len(arms)), strict=True):
        part = points[points["arm"] == arm]
        part = part.loc[part.groupby("lr")["mean"].idxmax() if maximize else part.groupby("lr")["mean"].idxmin()]
        part = part.sort_values("lr")
        yerr = np.vstack([part["mean"] - part["min"], part["max"] - part["mean"]])
        ax.errorbar(part["lr"], part["mean"], yerr=yerr, fmt="-o", color=color, capsize=3, markersize=4,
                    label=f"{arm} (n={int(part['n'].max())})")
        best = arms[arms["arm"] == arm].iloc[0]
        ax.scatter([best["best_lr"]], [best["mean"]], s=120, facecolors="none", edgecolors=color, zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale); error bars: range over seeds; rings: each arm's best")
    ax.set_ylabel(_ylabel(meta))
    ax.set_title(f"{meta.name}: {meta.metric} vs learning rate per arm", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)
