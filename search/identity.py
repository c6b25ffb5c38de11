"""Which stored study a sweep command means: a study is identified by itself, never by its name alone.

A study records, when it is created, the settings that decide its results (the resolved training config of
every trial's base, the search space, variants, width matching, learning-rate and weight-decay grids, metric,
sampler, pruner, seeds) as a fingerprint, and a random uid. The uid keys everything the study writes outside its
storage: trial folders (runs/sweeps/<study>-<uid>/trial-NNNN), MLflow runs and reports. So a study of the same
name in another storage, or after its storage was deleted, never restores, overwrites or reports another study's
results.

Running a study again with settings that differ from the stored study's (a changed `train.` override, say)
does not reuse it: the command goes to the version of the study whose fingerprint matches, or creates the
next version `<name>.v2`, `<name>.v3` ... in the same storage and says so. Settings that do not change a
trial's result (n_trials, workers, storage, heartbeats, output folders) are not part of the fingerprint:
changing n_trials tops the same study up.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import optuna

from hybrids.training.config import differences
from search.study_config import StudyConfig

FINGERPRINT = "fingerprint"
SETTINGS = "settings"
UID = "uid"
VERSION = "version"


@dataclass(frozen=True)
class StudyIdentity:
    """One stored study.

    Attributes:
        name: the Optuna study name: the study's own name for version 1, `<name>.v<k>` for version k.
        version: 1, 2, ...
        uid: random, fixed at creation; keys the study's trial folders, MLflow runs and reports.
    """

    name: str
    version: int
    uid: str

    @property
    def key(self) -> str:
        """The folder name of the study's trials and reports: `<name>-<uid>`."""
        return f"{self.name}-{self.uid}"


def settings(config: StudyConfig, extra_train: list[str]) -> dict[str, Any]:
    """The settings that decide a study's results, flattened to {"train.optim.lr": 0.003, "space...": ...}."""
    from hybrids.training.config import compose, flatten, scored, to_dict

    base = scored(to_dict(compose([*config.train, *extra_train])))
    study = {"metric": config.metric, "direction": config.direction, "sampler": config.sampler,
             "pruner": config.pruner, "seeds": list(config.seeds), "match": config.match,
             "lr_grid": config.lr_grid, "wd_grid": config.wd_grid,
             "space": {k: asdict(p) for k, p in config.space.items()}, "variants": config.variants}
    if config.eval is not None:  # only when set: a study stored before the key existed keeps its fingerprint
        study["eval"] = config.eval
    return {k: _plain(v) for k, v in flatten({"train": base, **study}).items()}


def applicable(values: dict[str, Any]) -> dict[str, Any]:
    """`settings` without those that cannot act on any of the study's runs: schedule fields that none of its
    schedules reads (hybrids.training.schedules.SCHEDULE_FIELDS) and data.reset_at_boundaries where no run has
    documents (every task but `lm`). A field added to the toolkit after a study was stored thus leaves it the same
    study where the field cannot act, and starts a new version where it can. The schedules and tasks that the
    study's space or variants choose per trial count as well."""
    from hybrids.training.schedules import SCHEDULE_FIELDS

    per_trial = " ".join(f"{k} {v}" for k, v in values.items() if k.startswith(("space", "variants")))
    out = dict(values)
    names = {values.get("train.schedule.name"), *re.findall(r"\bschedule(?:\.name)?=([\w-]+)", per_trial)}
    if names <= set(SCHEDULE_FIELDS) and "space.schedule" not in per_trial:
        used = {"name", "warmup_steps", *(f for name in names for f in SCHEDULE_FIELDS[name])}
        out = {k: v for k, v in out.items() if not k.startswith("train.schedule.") or k.split(".", 2)[2] in used}
    tasks = {values.get("train.task.name"), values.get("train.phase2_task.name"),
             *re.findall(r"\btask=([\w-]+)", per_trial)}
    if "lm" not in tasks and "space.task" not in per_trial:
        out.pop("train.data.reset_at_boundaries", None)
    return out


def _plain(value: Any) -> Any:
    """JSON-stable values: lists and dicts as canonical JSON text, so that they compare as wholes."""
    return json.dumps(value, sort_keys=True, default=str) if isinstance(value, list | dict) else value


def fingerprint(values: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def base_name(study_name: str) -> str:
    """"attention-spacing.v3" -> "attention-spacing"."""
    return re.sub(r"\.v\d+$", "", study_name)


def versions(storage, name: str) -> list[tuple[int, str]]:
    """(version, Optuna name) of every stored version of the study `name`, oldest first."""
    pattern = re.compile(rf"{re.escape(name)}(?:\.v(\d+))?")
    found = []
    for study_name in optuna.get_all_study_names(storage=storage):
        m = pattern.fullmatch(study_name)
        if m:
            found.append((int(m.group(1) or 1), study_name))
    return sorted(found)


def resolve(storage, config: StudyConfig, extra_train: list[str]) -> tuple[optuna.Study, StudyIdentity, str]:
    """The stored study this command means, creating it (or its next version) when none matches.

    Returns:
        The loaded study, its identity and one line for the user saying what was chosen and why.
    """
    values = settings(config, extra_train)
    digest, mine = fingerprint(values), applicable(values)
    latest: tuple[int, optuna.Study] | None = None
    for version, study_name in versions(storage, config.name):
        study = optuna.load_study(study_name=study_name, storage=storage)
        if study.user_attrs.get(FINGERPRINT) == digest or applicable(study.user_attrs.get(SETTINGS) or {}) == mine:
            return study, _identity(study, version), ""
        latest = (version, study)
    if latest is None:
        study, identity = _create(storage, config, 1, values, digest)
        return study, identity, f"study {identity.name}: new (uid {identity.uid})"
    old_version, old = latest
    study, identity = _create(storage, config, old_version + 1, values, digest)
    why = differences(applicable(old.user_attrs.get(SETTINGS) or {}), mine)
    return study, identity, (
        f"study {config.name}: settings differ from the stored {old.study_name} ({why}); started version "
        f"{identity.version} as {identity.name} (uid {identity.uid}); {old.study_name} and its results are kept")


def _identity(study: optuna.Study, version: int) -> StudyIdentity:
    uid = study.user_attrs.get(UID)
    if uid is None:  # a study stored by an older hybrids: give it a uid now, so its folders are its own from here
        uid = uuid.uuid4().hex[:10]
        study.set_user_attr(UID, uid)
    return StudyIdentity(study.study_name, version, uid)


def _create(storage, config: StudyConfig, version: int, values: dict, digest: str) -> tuple[optuna.Study,
                                                                                          StudyIdentity]:
    """Create version `version`; if another process took that name meanwhile, try the next one."""
    while True:
        name = config.name if version == 1 else f"{config.name}.v{version}"
        try:
            study = optuna.create_study(study_name=name, storage=storage, direction=config.direction)
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=name, storage=storage)
            if study.user_attrs.get(FINGERPRINT) == digest:
                return study, _identity(study, version)
            version += 1
            continue
        study.set_user_attr(SETTINGS, values)
        study.set_user_attr(VERSION, version)
        study.set_user_attr(UID, uuid.uuid4().hex[:10])
        study.set_user_attr(FINGERPRINT, digest)  # last: a study with a fingerprint is complete
        return study, _identity(study, version)
