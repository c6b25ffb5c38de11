"""Training curves from run directories: csv/version_N/metrics.csv, one file per attempt of a run.

A resumed run restarts from its last checkpoint and logs again from there, so a later attempt's row for a step
replaces an earlier attempt's, metric by metric (Lightning's CSV rows are sparse: train and val rows differ).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd


def _version(path: Path) -> int:
    suffix = path.parent.name.removeprefix("version_")
    return int(suffix) if suffix.isdigit() else -1


def read_metrics(run_dir: str | Path | None) -> pd.DataFrame | None:
    """All logged metrics of one run, one row per step.

    Args:
        run_dir: the training run's directory (holding csv/version_*/metrics.csv).
    Returns:
        A frame indexed by step with one column per metric (NaN where a step did not log it), or None when the
        run directory has no readable metrics.
    """
    if not isinstance(run_dir, str | Path) or not str(run_dir):
        return None
    paths = sorted(Path(run_dir).expanduser().glob("csv/version_*/metrics.csv"), key=_version)
    frames = []
    for path in paths:
        try:
            frame = pd.read_csv(path)
        except (OSError, ValueError):  # an attempt killed while writing its header leaves an empty file
            continue
        if "step" in frame.columns:
            frames.append(frame.drop(columns=["epoch"], errors="ignore"))
    if not frames:
        return None
    merged = None
    for frame in frames:  # oldest attempt first, so that later attempts win
        frame = frame.dropna(subset=["step"]).astype({"step": int}).groupby("step").last()
        merged = frame if merged is None else frame.combine_first(merged)
    return merged.sort_index() if len(merged) else None


def lr_column(metrics: pd.DataFrame) -> str | None:
    """The learning-rate column: "lr", else the first that starts with "lr" (Lightning's "lr-AdamW")."""
    if "lr" in metrics.columns:
        return "lr"
    return next((c for c in metrics.columns if c.startswith("lr")), None)


def smooth(values: pd.Series, points: int = 60) -> pd.Series:
    """A centred rolling mean that leaves about `points` independent points: tiny-model losses are noisy."""
    window = max(1, math.ceil(len(values) / points))
    return values.rolling(window, center=True, min_periods=1).mean() if window > 1 else values


def trial_curves(df: pd.DataFrame) -> dict[int, pd.DataFrame]:
    """{trial number: metrics} for the trials whose run_dir has metrics (complete, pruned and failed alike)."""
    if "run_dir" not in df.columns:
        return {}
    curves = {}
    for number, run_dir in zip(df["number"], df["run_dir"], strict=True):
        metrics = read_metrics(run_dir)
        if metrics is not None:
            curves[int(number)] = metrics
    return curves
