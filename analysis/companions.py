"""Reports that join companion studies: the same protocol, run later for further arms (new blocks beside a stored
published-suite study, say), read as one comparison without re-running the arms already finished.

    hybrids report study=zoology-fig2 with=zoology-fig2-new-blocks

A companion must be the primary study's protocol: every recorded setting equal (task, training, learning-rate and
weight-decay grids, seeds, the settings' choices, metric) except the choices of the arm dimensions, the `variants`
entries and the options of blocks (`train.model.blocks.*`), which only its own arms read. Its trials join as
further rows, numbered from k x 100000 for the k-th companion, with a `study` column naming their study.
"""

from __future__ import annotations

import dataclasses

import optuna
import pandas as pd

from analysis.frames import ReportError, StudyMeta, config_labels, load_study, resolve_group_by, trials_frame
from hybrids.training.config import differences
from search.identity import SETTINGS, applicable

OFFSET = 100_000


def _may_differ(key: str, arm_by: list[str]) -> bool:
    return key.startswith(("variants.", "train.model.blocks.")) or any(key.startswith(f"space.{a}.") for a in arm_by)


def check_companion(primary: optuna.Study, meta: StudyMeta, other: optuna.Study, other_meta: StudyMeta) -> None:
    """Raises ReportError naming the settings in which `other` is not `primary`'s protocol."""
    if not meta.arm_by:
        raise ReportError(f"{meta.name} records no arm dimensions (arm_by): a companion study has nothing to add to")
    if other_meta.arm_by != meta.arm_by:
        raise ReportError(f"{other_meta.name} compares arms over {other_meta.arm_by}, {meta.name} over {meta.arm_by}")
    mine = {k: v for k, v in applicable(primary.user_attrs.get(SETTINGS) or {}).items()
            if not _may_differ(k, meta.arm_by)}
    theirs = {k: v for k, v in applicable(other.user_attrs.get(SETTINGS) or {}).items()
              if not _may_differ(k, meta.arm_by)}
    if mine != theirs:
        raise ReportError(f"{other_meta.name} is not {meta.name}'s protocol ({differences(mine, theirs)}); "
                          f"only the arms' choices, variants and block options may differ")


def join(storage, primary: optuna.Study, meta: StudyMeta, df: pd.DataFrame,
         names: list[str]) -> tuple[pd.DataFrame, StudyMeta]:
    """The primary study's trials frame with each companion's trials appended, and the meta of the joined report
    (its uid names every study joined, so the report gets a folder of its own)."""
    if not names:
        return df, meta
    frames, uids = [df.assign(study=meta.name)], [meta.uid or meta.name]
    for k, name in enumerate(names, 1):
        if name == meta.name:
            raise ReportError(f"with={name} names the study itself")
        other, other_meta = load_study(storage, name)
        check_companion(primary, meta, other, other_meta)
        extra = trials_frame(other, meta)
        extra["number"] = extra["number"] + k * OFFSET
        frames.append(extra.assign(study=name))
        uids.append(other_meta.uid or name)
    joined = pd.concat(frames, ignore_index=True)
    joined.attrs.update(df.attrs)
    joined.attrs["params"] = sorted({p for f in frames for p in f.attrs.get("params", [])})
    joined.attrs["joined"] = [meta.name, *names]
    joined["config"] = config_labels(joined, resolve_group_by(joined))
    question = f"{meta.question} (joined with {', '.join(names)})".strip()
    joined_meta = dataclasses.replace(meta, uid="+".join(uids), question=question)
    joined.attrs.update(joined_meta.as_attrs())
    return joined, joined_meta
