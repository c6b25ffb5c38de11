"""The report's figures, each drawn only when the study's data supports it (else `FigureSkipped` says why).

Every function takes the trials frame (with a "config" label column), the summary and the study's metadata, and
writes one PNG. Matplotlib's object API is used without pyplot: no display, no global state, Agg canvas.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from analysis.curves import lr_column, smooth
from analysis.frames import StudyMeta
from analysis.tables import fmt_number, human_bytes, human_count

FAMILY_COLORS = {"hybrid": "tab:blue", "pure Mamba": "tab:orange", "pure transformer": "tab:green", "": "tab:gray"}
X_LABELS = {"n_invocations": "shared-attention invocations", "n_layers": "backbone layers",
            "n_attention": "attention layers + shared-attention invocations",
            "params_unique": "unique parameters", "kv_bytes": "KV-cache bytes", "flops_per_token": "FLOPs per token"}


class FigureSkipped(Exception):
    """The data cannot support this figure; the message, for the report, says why."""


def _new(width: float, height: float, ncols: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(np.atleast_1d(fig.subplots(1, ncols)))


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=150)
    return path


def _ylabel(meta: StudyMeta) -> str:
    return f"{meta.metric} ({'higher' if meta.direction == 'maximize' else 'lower'} is better)"


def _complete(df: pd.DataFrame) -> pd.DataFrame:
    """Complete trials with a finite objective."""
    if df.empty:
        return df
    done = df[df["state"] == "COMPLETE"].copy()
    done["value"] = pd.to_numeric(done["value"], errors="coerce")
    return done[np.isfinite(done["value"])]


def _scored(summary: pd.DataFrame) -> pd.DataFrame:
    """Configurations with at least one complete trial."""
    return summary[summary["n"] > 0] if len(summary) else summary


def _jitter(n: int, width: float) -> np.ndarray:
    return np.linspace(-width, width, n) if n > 1 else np.zeros(n)


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def spacing(df: pd.DataFrame, summary: pd.DataFrame, meta: StudyMeta, path: Path) -> Path:
    """(a) The objective against the study's x (shared-attention invocations by default): mean ± std over seeds,
    seeds as points, the pure-Mamba and pure-transformer endpoints labelled."""
    x = meta.x or "n_invocations"
    done, scored = _complete(df), _scored(summary)
    if x not in df.columns:
        raise FigureSkipped(f"the trials have no attribute or param {x!r} for the x axis")
    done = done.assign(_x=pd.to_numeric(done[x], errors="coerce")) if len(done) else done
    points = []  # (x, row, seed values)
    for _, row in scored.iterrows():
        trials = done[done["config"] == row["group"]]
        xs = trials["_x"].dropna()
        if len(xs):
            at = float(xs.median())
            if row.get("family") == "pure transformer" and x == "n_invocations" and not pd.isna(row.get("n_layers")):
                at = float(row["n_layers"])  # attention in every layer, though it invokes no shared block
            points.append((at, row, trials["value"].to_numpy()))
    if len({p[0] for p in points}) < 2:
        raise FigureSkipped(f"needs complete trials at 2 or more values of {x!r}")
    span = max(p[0] for p in points) - min(p[0] for p in points)
    fig, (ax,) = _new(7.5, 4.8)
    for at, row, seeds in points:
        color = FAMILY_COLORS.get(row.get("family", ""), "tab:gray")
        ax.scatter(at + _jitter(len(seeds), 0.012 * span), seeds, s=14, color=color, alpha=0.45, zorder=2)
        std = row["std"] if not pd.isna(row["std"]) else 0.0
        ax.errorbar(at, row["mean"], yerr=std, fmt="o", color=color, capsize=4, markersize=6, zorder=3)
    sign = 1.0 if meta.direction == "maximize" else -1.0
    best: dict[float, float] = {}
    for at, row, _ in points:
        if at not in best or sign * row["mean"] > sign * best[at]:
            best[at] = row["mean"]
    line = sorted(best.items())
    ax.plot([p[0] for p in line], [p[1] for p in line], color="0.6", lw=1, ls="--", zorder=1,
            label="best configuration at each x")
    label_all = len(points) <= 12
    for at, row, _ in points:
        name = row.get("family") if row.get("family") in ("pure Mamba", "pure transformer") else None
        layout = row.get("layout") if isinstance(row.get("layout"), str) else row["group"]
        if name or label_all:
            text = f"{name}\n{layout}" if name else layout
            ax.annotate(text, (at, row["mean"]), textcoords="offset points", xytext=(6, 6),
                        fontsize=8 if name else 7, color="black" if name else "0.35",
                        fontweight="bold" if name else "normal")
    for family, color in FAMILY_COLORS.items():
        if family and any(p[1].get("family") == family for p in points):
            ax.scatter([], [], color=color, label=family)
    ax.legend(fontsize=8, loc="best")
    if x in ("n_invocations", "n_attention", "n_layers"):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(X_LABELS.get(x, x))
    ax.set_ylabel(_ylabel(meta))
    ax.set_title(meta.question or f"{meta.metric} vs {x}", fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def ablation(df: pd.DataFrame, summary: pd.DataFrame, meta: StudyMeta, path: Path) -> Path:
    """(b) One bar per configuration, best on top: mean ± std over seeds, the seeds as dots."""
    scored, done = _scored(summary), _complete(df)
    if len(scored) < 2:
        raise FigureSkipped("needs 2 or more configurations with a complete trial")
    seeds = [done.loc[done["config"] == g, "value"].to_numpy() for g in scored["group"]]
    std = scored["std"].fillna(0.0).to_numpy()
    means = scored["mean"].to_numpy()
    lo = min(min(s.min() for s in seeds), (means - std).min())
    hi = max(max(s.max() for s in seeds), (means + std).max())
    zoom = lo > 0 and hi - lo < 0.25 * hi  # bars from 0 would hide the differences
    pad = (hi - lo) or abs(hi) * 0.05 or 1.0
    left = lo - 0.25 * pad if zoom else min(0.0, lo - 0.05 * pad)
    fig, (ax,) = _new(8, 1.2 + 0.45 * len(scored))
    y = np.arange(len(scored))[::-1]
    colors = [FAMILY_COLORS.get(f, "tab:blue") if f else "tab:blue" for f in scored.get("family", [""] * len(y))]
    ax.barh(y, means - left, left=left, xerr=std, color=colors, alpha=0.55, capsize=3, height=0.6)
    for yi, values in zip(y, seeds, strict=True):
        ax.scatter(values, yi + _jitter(len(values), 0.12), s=14, color="black", zorder=3)
    for yi, row in zip(y, (r for _, r in scored.iterrows()), strict=True):
        spread = f" ± {fmt_number(row['std'], 2)}" if not pd.isna(row["std"]) else ""
        ax.text(hi + 0.04 * pad, yi, f"{fmt_number(row['mean'])}{spread} (n={row['n']})", va="center", fontsize=7)
    ax.set_yticks(y, [str(g) if len(str(g)) <= 48 else str(g)[:45] + "..." for g in scored["group"]], fontsize=8)
    ax.set_xlim(left, hi + 0.45 * pad)
    ax.set_xlabel(_ylabel(meta) + (" — axis does not start at 0" if zoom else ""))
    ax.set_title(meta.question or f"{meta.metric} per configuration", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def curves(df: pd.DataFrame, summary: pd.DataFrame, meta: StudyMeta, runs: dict[int, pd.DataFrame],
           path: Path) -> Path:
    """(c) train/loss and lr against step, one colour per configuration (every seed drawn; pruned and failed runs
    dashed), val/loss as dots; the step where phase 2 of a two-phase schedule starts is marked on the LR panel."""
    if not runs:
        raise FigureSkipped("no trial's run_dir holds csv/version_*/metrics.csv")
    config = dict(zip(df["number"].astype(int), df["config"], strict=True))
    state = dict(zip(df["number"].astype(int), df["state"], strict=True))
    order = [g for g in summary["group"] if any(config.get(n) == g for n in runs)]
    colors = dict(zip(order, _colors(len(order)), strict=True))
    fig, (loss_ax, lr_ax) = _new(12, 4.6, ncols=2)
    labelled: set[str] = set()
    losses = []
    rank = {g: i for i, g in enumerate(order)}  # the legend lists configurations best first, as the table does
    for number, metrics in sorted(runs.items(), key=lambda item: (rank.get(config.get(item[0]), len(rank)), item[0])):
        group = config.get(number)
        color = colors.get(group, "tab:gray")
        label = group if group not in labelled else None
        labelled.add(group)
        style = "-" if state.get(number) == "COMPLETE" else "--"
        if "train/loss" in metrics.columns:
            loss = metrics["train/loss"].dropna()
            losses.append(loss)
            loss_ax.plot(loss.index, smooth(loss), color=color, lw=1.2, ls=style, alpha=0.85, label=label)
        if "val/loss" in metrics.columns:
            val = metrics["val/loss"].dropna()
            loss_ax.scatter(val.index, val, color=color, s=12, marker="o", edgecolor="black", lw=0.4, zorder=3)
        if (lr := lr_column(metrics)) is not None:
            rate = metrics[lr].dropna()
            lr_ax.plot(rate.index, rate, color=color, lw=1.2, ls=style, alpha=0.85, label=label)
        if "data/phase2_fraction" in metrics.columns:
            phase2 = metrics["data/phase2_fraction"].dropna()
            if (phase2 > 0).any():
                lr_ax.axvline(phase2[phase2 > 0].index[0], color=color, ls=":", lw=1)
    if not losses and not lr_ax.lines:
        raise FigureSkipped("the metrics CSVs have neither train/loss nor lr")
    low = min((s[s > 0].min() for s in losses if (s > 0).any()), default=None)
    if low and max(s.max() for s in losses) / low > 10:
        loss_ax.set_yscale("log")
        loss_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        loss_ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    loss_ax.set(xlabel="step", ylabel="train/loss (smoothed); dots: val/loss", title="Loss")
    lr_ax.set(xlabel="step", ylabel="learning rate", title="Learning-rate schedule (dotted: phase 2 starts)"
              if any("data/phase2_fraction" in m.columns for m in runs.values()) else "Learning-rate schedule")
    for ax in (loss_ax, lr_ax):
        ax.grid(alpha=0.3)
    (lr_ax if lr_ax.lines else loss_ax).legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    unfinished = sum(state.get(n) != "COMPLETE" for n in runs)
    fig.suptitle(f"{meta.name}: training curves of {len(runs)} runs"
                 + (f" ({unfinished} pruned or failed: dashed)" if unfinished else ""), fontsize=10)
    return _save(fig, path)


def importance(study: optuna.Study, df: pd.DataFrame, meta: StudyMeta, path: Path) -> Path:
    """(d) Optuna's fANOVA parameter importances (seeded), when 2 or more params vary over 3 or more trials."""
    if df.attrs.get("joined"):
        raise FigureSkipped("the report joins several studies; Optuna's importances read one study's trials")
    done = _complete(df)
    varying = [p for p in df.attrs.get("params", []) if p in done.columns and done[p].nunique(dropna=True) > 1]
    if len(done) < 3 or len(varying) < 2:
        raise FigureSkipped(f"needs 3 or more complete trials and 2 or more varying params "
                            f"(has {len(done)} and {len(varying)})")
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        scores = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (ImportError, ValueError, RuntimeError) as err:
        raise FigureSkipped(f"optuna could not compute importances: {err}") from err
    if not scores:
        raise FigureSkipped("optuna found no param shared by every complete trial")
    names = list(scores)[::-1]
    fig, (ax,) = _new(7, 1.2 + 0.4 * len(names))
    ax.barh(names, [scores[n] for n in names], color="tab:purple", alpha=0.7)
    for i, name in enumerate(names):
        ax.text(scores[name], i, f" {scores[name]:.2f}", va="center", fontsize=8)
    ax.set_xlim(0, max(scores.values()) * 1.2 or 1)
    ax.set_xlabel(f"importance for {meta.metric} (fANOVA, normalised)")
    ax.set_title(f"{meta.name}: parameter importance over {len(done)} complete trials", fontsize=10)
    return _save(fig, path)


def pareto_front(costs: np.ndarray, quality: np.ndarray, maximize: bool) -> np.ndarray:
    """Indices of the points no other point beats on both cost (lower) and quality, cheapest first."""
    sign = 1.0 if maximize else -1.0
    order = np.lexsort((-sign * quality, costs))  # by cost, then best quality first
    front, best = [], -math.inf
    for i in order:
        if sign * quality[i] > best:
            front.append(i)
            best = sign * quality[i]
    return np.array(front, dtype=int)


def _pareto_panel(ax, points: pd.DataFrame, cost: str, meta: StudyMeta) -> None:
    costs, quality = points[cost].to_numpy(float), points["mean"].to_numpy(float)
    front = pareto_front(costs, quality, meta.direction == "maximize")
    ax.errorbar(costs, quality, yerr=points["std"].fillna(0).to_numpy(), fmt="o", color="0.6", capsize=3,
                markersize=5, label="configuration (mean ± std)")
    ax.step(costs[front], quality[front], where="post", color="tab:red", lw=1.5, label="Pareto front")
    ax.scatter(costs[front], quality[front], color="tab:red", s=40, zorder=3)
    for i in front:
        row = points.iloc[i]
        text = row["layout"] if isinstance(row.get("layout"), str) else str(row["group"])
        ax.annotate(text, (costs[i], quality[i]), textcoords="offset points", xytext=(5, -11), fontsize=7)
    positive = costs[costs > 0]
    if len(positive) and costs.max() / positive.min() > 20:
        ax.set_xscale("symlog" if (costs <= 0).any() else "log", **({"linthresh": positive.min()}
                                                                    if (costs <= 0).any() else {}))
    fmt = human_bytes if cost.endswith("bytes") else human_count
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt(v)))
    ax.set_xlabel(X_LABELS.get(cost, cost) + " (lower is cheaper)")
    ax.set_ylabel(_ylabel(meta))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def pareto(df: pd.DataFrame, summary: pd.DataFrame, meta: StudyMeta, path: Path) -> Path:
    """(e) Quality against KV-cache bytes and against unique parameters, per configuration, with the front."""
    scored = _scored(summary)
    costs = [c for c in ("kv_bytes", "params_unique") if c in scored.columns
             and pd.to_numeric(scored[c], errors="coerce").nunique() >= 2]
    if not costs:
        raise FigureSkipped("needs 2 or more configurations that differ in kv_bytes or params_unique")
    fig, axes = _new(6 * len(costs), 4.6, ncols=len(costs))
    for ax, cost in zip(axes, costs, strict=True):
        points = scored.assign(**{cost: pd.to_numeric(scored[cost], errors="coerce")}).dropna(subset=[cost])
        _pareto_panel(ax, points.reset_index(drop=True), cost, meta)
    fig.suptitle(f"{meta.name}: quality vs cost", fontsize=10)
    return _save(fig, path)
