"""Optuna studies as data frames: one row per trial, and one row per configuration (seeds pooled).

The sweep stores what a report needs on the study and its trials (see `StudyMeta` and `study_frame`); this module
only reads it. Frames carry the study's metadata in `df.attrs`, so that `summary_frame` knows the direction.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import optuna
import pandas as pd

import blocks
from hybrids.layout import Layer, parse_layout
from search import storage as search_storage
from search.identity import SETTINGS, base_name, versions
from search.study_config import DEFAULT_STORAGE as DEFAULT_STORAGE  # re-exported by analysis

ACCOUNTING = ("layout", "d_model", "n_layers", "n_invocations", "n_attention", "params_unique", "flops_per_token",
              "kv_bytes", "state_bytes")
# Long or per-trial-only attributes that a table of trials does not need (the resolved YAML is in MLflow).
NOT_TABULATED = ("config_yaml",)
KINDS = ("spacing", "ablation", "schedule", "generic")
SETTING = "variant"  # the study param whose values are task settings: arms are compared within a setting only
INTEGERS = ("d_model", "n_layers", "n_invocations", "n_attention", "params_unique", "flops_per_token", "kv_bytes",
            "state_bytes", "seed", "best_trial")


class ReportError(blocks.ConfigError):
    """A problem the user can fix (unknown study, missing storage); the CLI prints it in one line."""


@dataclass
class StudyMeta:
    """What the sweep recorded on the study (its user attrs), with defaults for studies that lack them."""

    name: str
    storage: str
    metric: str = "value"
    direction: str = "maximize"
    question: str = ""
    group_by: list[str] = field(default_factory=list)
    x: str | None = None
    kind: str = "generic"
    mlflow_parent_run_id: str | None = None
    tracking_uri: str | None = None
    uid: str | None = None  # the study's own id (search.identity): keys its report folder
    versions: list[str] = field(default_factory=list)  # other versions of the study in the same storage
    arm_by: list[str] = field(default_factory=list)  # the params that define an arm (search.protocol)
    lr_grid: list[float] | None = None
    wd_grid: list[float] | None = None
    match_by: str | None = None  # params | flops | state; None: the arms are not budget-matched
    match_budget: int | None = None  # the reference configuration's budget
    setting_choices: list | None = None  # every value of the study's `SETTING` param, from its recorded space

    def as_attrs(self) -> dict:
        return asdict(self)


def open_storage(storage) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL, a journal file or a storage object.

    Args:
        storage: an RDB URL ("sqlite:///runs/optuna.db", "postgresql://..."), "journal:<path>" or a path to a
            journal file (JournalFileBackend), a path to a SQLite file, or an Optuna storage object.
    Returns:
        The storage, opened by `search.storage.open_storage`.
    Raises:
        ReportError: when a file-based storage does not exist (opening would silently create an empty one).
    """
    if not isinstance(storage, str | Path):
        return storage
    text = str(storage)
    if "://" not in text and not text.startswith("journal:"):
        path = Path(text).expanduser()
        text = f"sqlite:///{path}" if path.suffix in (".db", ".sqlite", ".sqlite3") else f"journal:{path}"
    for prefix in ("sqlite:///", "journal:"):
        if text.startswith(prefix):
            path = Path(text.removeprefix(prefix)).expanduser()
            if not path.is_file():
                raise ReportError(f"no Optuna storage at {path} (from {storage!r}); run a study first or pass an "
                                  "RDB URL such as sqlite:///runs/optuna.db or the path of a journal file")
            text = prefix + str(path)
    return search_storage.open_storage(text)


def load_study(storage, study_name: str) -> tuple[optuna.Study, StudyMeta]:
    """Load a study and read its metadata.

    Raises:
        ReportError: for a missing storage or an unknown study name (the message lists the known ones).
    """
    opened = open_storage(storage)
    names = optuna.get_all_study_names(storage=opened)
    if study_name not in names:
        known = ", ".join(sorted(names)) or "none"
        raise ReportError(f"no study named {study_name!r} in {storage}; studies there: {known}")
    study = optuna.load_study(study_name=study_name, storage=opened)
    attrs = study.user_attrs
    direction = attrs.get("direction") or study.directions[0].name.lower()
    kind = attrs.get("kind") or "generic"
    meta = StudyMeta(
        name=study_name, storage=str(storage), metric=attrs.get("metric") or "value", direction=direction,
        question=attrs.get("question") or "", group_by=list(attrs.get("group_by") or []), x=attrs.get("x") or None,
        kind=kind if kind in KINDS else "generic", mlflow_parent_run_id=attrs.get("mlflow_parent_run_id"),
        tracking_uri=attrs.get("tracking_uri"), uid=attrs.get("uid"),
        versions=[n for _, n in versions(opened, base_name(study_name)) if n != study_name],
        arm_by=list(attrs.get("arm_by") or []), lr_grid=attrs.get("lr_grid"), wd_grid=attrs.get("wd_grid"),
        match_by=attrs.get("match_by"), match_budget=attrs.get("match_budget"),
        setting_choices=_choices(attrs.get(SETTINGS) or {}, SETTING))
    return study, meta


def _choices(settings: dict, param: str) -> list | None:
    """A param's choices from the settings a study records at creation (search.identity: JSON text)."""
    text = settings.get(f"space.{param}.choices")
    try:
        return json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        return None


def _trial_row(trial: optuna.trial.FrozenTrial, param_names: set[str]) -> dict:
    row = {"number": trial.number, "state": trial.state.name,
           "value": trial.values[0] if trial.values else None}
    row.update(trial.params)
    for key, value in trial.user_attrs.items():
        if key == "metrics" and isinstance(value, dict):
            row.update({f"metric:{name}": v for name, v in value.items()})
        else:
            row[f"attr:{key}" if key in param_names or key in row else key] = value
    start, end = trial.datetime_start, trial.datetime_complete
    row["datetime_start"] = start
    row["duration_s"] = (end - start).total_seconds() if start and end else None
    return row


def trials_frame(study: optuna.Study, meta: StudyMeta) -> pd.DataFrame:
    """`study_frame` for a study already loaded."""
    trials = study.get_trials(deepcopy=False)
    param_names = {name for t in trials for name in t.params}
    df = pd.DataFrame([_trial_row(t, param_names) for t in trials])
    if df.empty:
        df = pd.DataFrame(columns=["number", "state", "value", "datetime_start", "duration_s"])
    df.attrs.update(meta.as_attrs())
    df.attrs["params"] = sorted(param_names)
    if len(df):
        df["config"] = config_labels(df, resolve_group_by(df))
    metrics = [c for c in df.columns if c.startswith("metric:")]
    first = ["number", "state", "value", "config", *sorted(param_names), *metrics, *ACCOUNTING, "seed", "group"]
    first = [c for c in dict.fromkeys(first) if c in df.columns]
    return _integers(df[first + [c for c in df.columns if c not in first]])


def study_frame(storage, study_name: str) -> pd.DataFrame:
    """One row per trial of a study.

    Args:
        storage: see `open_storage`.
        study_name: the study's name.
    Returns:
        Columns: number, state (COMPLETE, PRUNED, FAIL, RUNNING ...), value (the study metric), config (the
        configuration's label, see `config_labels`), one column per param (its name, e.g. "model.layout"),
        "metric:<name>" per final metric, the trial user attrs (a name that clashes with a param becomes
        "attr:<name>"), datetime_start and duration_s. `df.attrs` holds the study's `StudyMeta` fields and
        "params" (the param names).
    """
    return trials_frame(*load_study(storage, study_name))


def family(layout: str | None) -> str:
    """"pure Mamba" (state-space mixers only), "pure transformer" (attention only), "hybrid", or "" if unknown."""
    if not isinstance(layout, str) or not layout:
        return ""
    try:
        items = parse_layout(layout).items
    except (ValueError, LookupError):
        return ""
    kinds = {entry.symbol: entry.name for entry in blocks.entries()}
    mixers = {kinds.get(item.mixer if isinstance(item, Layer) else item.symbol, "") for item in items
              if not isinstance(item, Layer) or item.mixer}
    attention = {m for m in mixers if "attention" in m}
    if not mixers:
        return ""
    if not attention:
        return "pure Mamba" if all(m.startswith("mamba") for m in mixers) else ""
    return "pure transformer" if mixers == attention else "hybrid"


def _integers(frame: pd.DataFrame) -> pd.DataFrame:
    """Counts stay integers (nullable Int64) though a failed trial lacks them, so that CSVs read 4, not 4.0."""
    for column in INTEGERS:
        if column in frame.columns:
            try:
                frame[column] = frame[column].astype("Int64")
            except (TypeError, ValueError):  # not integral after all: leave it as the sweep wrote it
                pass
    return frame


def _label(keys: tuple, group_by: list[str]) -> str:
    """("2M:A*", 0.001) -> "layout=2M:A*, lr=0.001": the last part of each param's dotted name."""
    shown = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in keys]
    return ", ".join(f"{name.rsplit('.', 1)[-1]}={value}" for name, value in zip(group_by, shown, strict=True))


def resolve_group_by(df: pd.DataFrame, group_by: list[str] | None = None) -> list[str]:
    """The columns that identify a configuration: `group_by`, else the study's, else the sweep's "group" label,
    else every param except seeds; [] when nothing does (then every trial is its own configuration)."""
    group_by = [g for g in (group_by or df.attrs.get("group_by") or []) if g in df.columns]
    if group_by:
        return group_by
    if "group" in df.columns:
        return ["group"]
    return [p for p in df.attrs.get("params", []) if p in df.columns and not p.rsplit(".", 1)[-1].endswith("seed")]


def config_labels(df: pd.DataFrame, group_by: list[str]) -> pd.Series:
    """The configuration label of every trial: the sweep's "group" attr where its trials agree on one, else
    "name=value, ..." from the group_by params (so that failed trials without attrs land in their group)."""
    if not group_by:
        return df["number"].map(lambda n: f"trial {n}")
    # map(str), not astype(str): pandas 3 keeps a missing value (a WAITING trial has no params) as NaN under astype
    keys = df[group_by].map(str).agg("\x1f".join, axis=1)
    labels = {}
    for key, part in df.groupby(keys, sort=False):
        named = part["group"].dropna().unique() if "group" in part.columns else []
        labels[key] = named[0] if len(named) == 1 else _label(tuple(part[c].iloc[0] for c in group_by), group_by)
    return keys.map(labels)


def _first(values: pd.Series):
    values = values.dropna()
    return values.iloc[0] if len(values) else None


def _group_row(label: str, rows: pd.DataFrame, group_by: list[str], metrics: list[str], maximize: bool) -> dict:
    done = rows[rows["state"] == "COMPLETE"]
    values = pd.to_numeric(done["value"], errors="coerce").dropna()
    row = {"group": label, **{name: rows[name].iloc[0] for name in group_by if name != "group"}}
    for column in ACCOUNTING:
        if column in rows.columns:
            row[column] = _first(done[column]) if len(done) else _first(rows[column])
    row["family"] = family(row.get("layout"))
    row["n"] = len(values)
    row["pruned"] = int((rows["state"] == "PRUNED").sum())
    row["failed"] = int((rows["state"] == "FAIL").sum())
    row["mean"], row["std"] = values.mean(), values.std()
    row["min"], row["max"] = values.min(), values.max()
    row["best_trial"] = done.loc[values.idxmax() if maximize else values.idxmin(), "number"] if len(values) else None
    for name in metrics:
        column = pd.to_numeric(done[f"metric:{name}"], errors="coerce")
        row[f"{name} mean"], row[f"{name} std"] = column.mean(), column.std()
    if "duration_s" in done.columns:
        row["duration_s mean"] = pd.to_numeric(done["duration_s"], errors="coerce").mean()
    return row


def summary_frame(df: pd.DataFrame, group_by: list[str] | None = None, direction: str | None = None) -> pd.DataFrame:
    """Per configuration (the trials that share the group_by params, i.e. differ only in seed): the spread.

    Args:
        df: a `study_frame`.
        group_by: the param names that identify a configuration; default: see `resolve_group_by`.
        direction: "maximize" or "minimize"; default: the study's (from `df.attrs`).
    Returns:
        One row per configuration, best mean first (configurations without a complete trial last): group (label),
        the group_by values, the accounting attrs (layout, n_invocations, params_unique, kv_bytes ...), family,
        n (complete trials = seeds), pruned, failed, mean, std (sample std, NaN for one seed), min, max of the
        objective, best_trial (its number), "<metric> mean" / "<metric> std" for the other final metrics and
        "duration_s mean". `attrs` are the frame's, with the group_by used.
    """
    group_by = resolve_group_by(df, group_by)
    maximize = (direction or df.attrs.get("direction", "maximize")) == "maximize"
    objective = df.attrs.get("metric")
    metrics = [c.removeprefix("metric:") for c in df.columns if c.startswith("metric:") and c != f"metric:{objective}"]
    if df.empty:
        summary = pd.DataFrame(columns=["group", *group_by, "n", "pruned", "failed", "mean", "std", "min", "max"])
    else:
        labels = config_labels(df, group_by)
        rows = [_group_row(label, part, group_by, metrics, maximize) for label, part in df.groupby(labels, sort=False)]
        summary = pd.DataFrame(rows).sort_values("mean", ascending=not maximize, na_position="last", kind="stable")
    summary.attrs.update(df.attrs)
    summary.attrs["group_by"] = group_by
    return _integers(summary.reset_index(drop=True))
