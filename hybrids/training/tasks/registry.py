"""The registry of synthetic tasks: our own (recall.py), Zoology's (zoology.py) and MAD's (mad.py), by name."""

from __future__ import annotations

import dataclasses
from typing import Any

from blocks import ConfigError
from hybrids.training.tasks.base import SyntheticTask
from hybrids.training.tasks.mad import MAD_TASKS
from hybrids.training.tasks.recall import MQAR, LongCopy, SelectiveCopy
from hybrids.training.tasks.zoology import MultiqueryAR


def _register(*classes: type[SyntheticTask]) -> dict[str, type[SyntheticTask]]:
    registry: dict[str, type[SyntheticTask]] = {}
    for cls in classes:
        if cls.name in registry:
            raise ValueError(f"two synthetic tasks named {cls.name!r}: {registry[cls.name]} and {cls}")
        registry[cls.name] = cls
    return registry


TASKS: dict[str, type[SyntheticTask]] = _register(MQAR, SelectiveCopy, LongCopy, MultiqueryAR, *MAD_TASKS)


def task_options(name: str) -> list[str]:
    """The option names of task `name`, in the order of its config dataclass."""
    return [f.name for f in dataclasses.fields(TASKS[name].config_cls)]


def make_task(name: str, **options: Any) -> SyntheticTask:
    """Build a synthetic task by name.

    Args:
        name: a key of TASKS.
        **options: fields of that task's config dataclass (e.g. num_kv_pairs=16, seed=1).

    Returns:
        The task.

    Raises:
        ConfigError: an unknown name or option (listing the valid ones), a value of the wrong type, or an
            impossible combination (with the reason).
    """
    if not isinstance(name, str) or name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    valid = task_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for task {name!r}; valid options: "
                          f"{', '.join(valid)}")
    cls = TASKS[name]
    return cls(cls.config_cls(**options))
