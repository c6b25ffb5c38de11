"""How much of a factorial study's variance each factor explains: a balanced-ANOVA decomposition.

For factors F (e.g. layout, data mix, token budget) crossed in a full grid with n trials (seeds) in every cell,
the total sum of squares of the trial values about their grand mean splits exactly into

    SS_total = sum over non-empty S subset of F of SS_S  +  SS_within

where SS_S is the effect of S (a main effect for one factor, an interaction for several): with M_T the table of
marginal means over the factors outside T, the effect e_S = sum over T subset of S of (-1)^(|S|-|T|) M_T, and
SS_S = n * sum over cells of e_S(cell)^2. SS_within is the seeds' scatter about their cell means. The share of
S is SS_S / SS_total; the shares sum to 1. With one trial a cell, the highest interaction holds the noise too.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

WITHIN = "seeds (within cells)"


def variance_frame(df: pd.DataFrame, factors: list[str], value: str = "value") -> pd.DataFrame:
    """The variance decomposition of `value` over the full grid of `factors`.

    Args:
        df: one row per trial; a column per factor and the `value` column (NaN rows are dropped).
        factors: the factor columns, at least one.
        value: the response column.
    Returns:
        One row per effect (main effects first, then interactions by order) and a last row "seeds (within
        cells)": columns effect (factor names joined by " x "), order (number of factors; 0 for within),
        ss (sum of squares, in the value's units squared), df (degrees of freedom), share (ss / total ss).
    Raises:
        ValueError: with one line, for no factor, a grid with a missing cell, or cells with unequal trial counts.
    """
    if not factors:
        raise ValueError("a variance decomposition needs at least one factor")
    data = df.dropna(subset=[value])
    data = data.assign(**{f: data[f].astype(str) for f in factors})
    levels = {f: list(dict.fromkeys(data[f])) for f in factors}
    cells = data.groupby(factors, sort=False)[value]
    counts = cells.size()
    n_cells = int(np.prod([len(v) for v in levels.values()]))
    if len(counts) != n_cells:
        raise ValueError(f"the grid of {' x '.join(factors)} has {n_cells} cells, {len(counts)} with a trial: "
                         "a decomposition needs every cell")
    if counts.nunique() != 1:
        raise ValueError(f"cells hold {counts.min()} to {counts.max()} trials: a decomposition needs equal counts")
    n = int(counts.iloc[0])
    means = cells.mean()
    total = float(((data[value] - data[value].mean()) ** 2).sum())
    rows = []
    for order in range(1, len(factors) + 1):
        for subset in itertools.combinations(factors, order):
            effect = _effect(means, factors, list(subset))
            dof = int(np.prod([len(levels[f]) - 1 for f in subset]))
            rows.append({"effect": " x ".join(subset), "order": order, "ss": n * float((effect ** 2).sum()) *
                         n_cells / len(effect), "df": dof})
    within = float(((data[value] - cells.transform("mean")) ** 2).sum())
    rows.append({"effect": WITHIN, "order": 0, "ss": within, "df": len(data) - n_cells})
    out = pd.DataFrame(rows)
    out["share"] = out["ss"] / total if total > 0 else np.nan
    return out


def _effect(means: pd.Series, factors: list[str], subset: list[str]) -> pd.Series:
    """e_S over the levels of S (see the module docstring), from the cell means indexed by `factors`."""
    grand = float(means.mean())
    effect = None
    for size in range(len(subset) + 1):
        for inner in itertools.combinations(subset, size):
            sign = (-1) ** (len(subset) - size)
            if inner:
                marginal = means.groupby(level=list(inner), sort=False).mean()
                term = _broadcast(marginal, list(inner), subset, means)
            else:
                term = pd.Series(grand, index=_levels_index(means, subset))
            effect = sign * term if effect is None else effect + sign * term
    return effect


def _levels_index(means: pd.Series, subset: list[str]) -> pd.MultiIndex:
    return pd.MultiIndex.from_frame(means.index.to_frame(index=False)[subset].drop_duplicates())


def _broadcast(marginal: pd.Series, inner: list[str], subset: list[str], means: pd.Series) -> pd.Series:
    """The marginal means over `inner`, repeated over every combination of the levels of `subset`."""
    index = _levels_index(means, subset)
    keys = index.to_frame(index=False)[inner]
    values = marginal.reindex(pd.MultiIndex.from_frame(keys) if len(inner) > 1 else keys[inner[0]]).to_numpy()
    return pd.Series(values, index=index)


def study_variance(trials: pd.DataFrame, factors: list[str]) -> tuple[pd.DataFrame | None, str]:
    """A report's decomposition: over the complete trials at each arm's best grid point (`trials`), by the arm
    dimensions `factors`; (None, why) for fewer than 2 factors or a grid it cannot decompose."""
    if len(factors) < 2:
        return None, "needs 2 or more arm dimensions"
    done = trials[trials["state"] == "COMPLETE"] if "state" in trials.columns else trials
    try:
        return variance_frame(done, factors), ""
    except ValueError as why:
        return None, str(why)


def variance_cells(frame: pd.DataFrame, metric: str) -> tuple[list[str], list[list[str]], list[bool]]:
    """Headers, cells and numeric flags of the variance table (analysis.tables renders them)."""
    headers = ["effect", "df", f"sum of squares ({metric})", "share of variance"]
    rows = [[str(r["effect"]), str(int(r["df"])), f"{r['ss']:.4g}",
             "-" if pd.isna(r["share"]) else f"{r['share']:.1%}"] for _, r in frame.iterrows()]
    return headers, rows, [False, True, True, True]
