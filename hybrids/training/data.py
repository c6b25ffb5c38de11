"""From a task config to batches: synthetic tasks, LM text, and the two-phase mix of both phases.

Every batch is a pure function of (config, split, index): the trainer asks for batch `global_step`,
so a resumed run sees exactly the data an uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import Any

import torch

from blocks import ConfigError
from hybrids.training.schedules import Schedule
from hybrids.training.tasks import Batch, Task
from hybrids.training.tasks import make_task as make_synthetic_task


def make_task(config: dict[str, Any]) -> Task:
    """A Task from its config dict: {"name": "mqar", ...} or {"name": "lm", "sources": [...], ...}.

    LM sources given as mappings make a weighted mixture (see hybrids.training.corpus).
    The source "stdlib" stands for the running Python's standard-library sources (offline real text),
    "stdlib/<package>" for one package of it (e.g. a curated phase-2 subset).
    """
    options = dict(config)
    name = options.pop("name")
    if name != "lm":
        return make_synthetic_task(name, **options)
    from hybrids.training.corpus import is_mixture, make_mixture
    from hybrids.training.text import make_text_task, stdlib_source

    sources = options.pop("sources", ["stdlib"])
    if is_mixture(sources):
        return make_mixture(sources, options, lambda s: _expand(s, stdlib_source()))
    sources = [_expand(s, stdlib_source()) for s in ([sources] if isinstance(sources, str) else sources)]
    return make_text_task(sources, **options)


def _expand(source: str, stdlib_glob: str) -> str:
    """"stdlib" -> the standard library's sources; "stdlib/json" -> that package's sources."""
    if source == "stdlib":
        return stdlib_glob
    if source.startswith("stdlib/"):
        return stdlib_glob.replace("**/*.py", source.removeprefix("stdlib/") + "/**/*.py")
    return source


class MixedTask(Task):
    """Phase-1 data until the schedule's phase 2, then each batch mixes phase-2 data with a replayed share
    (the schedule's replay fraction) of phase-1 data. Validation reports on phase-1 data."""

    def __init__(self, phase1: Task, phase2: Task, schedule: Schedule):
        if phase1.seq_len != phase2.seq_len:
            raise ConfigError(f"phase2_task must have the same seq_len as task ({phase2.seq_len} != {phase1.seq_len})")
        self.phase1, self.phase2, self.schedule = phase1, phase2, schedule
        self.name = f"{phase1.name}+{phase2.name}"
        self.vocab_size = max(phase1.vocab_size, phase2.vocab_size)
        self.seq_len = phase1.seq_len

    def batch(self, index: int, batch_size: int, split: str = "train") -> Batch:
        share = self.schedule.phase2_fraction(index) if split == "train" else 0.0
        n2 = round(share * batch_size)
        if n2 == 0:
            return self.phase1.batch(index, batch_size, split)
        if n2 == batch_size:
            return self.phase2.batch(index, batch_size, split)
        a, b = self.phase1.batch(index, batch_size - n2, split), self.phase2.batch(index, n2, split)
        extra = {k: torch.cat([a.extra[k], b.extra[k]]) for k in a.extra.keys() & b.extra.keys()}
        return Batch(torch.cat([a.input_ids, b.input_ids]), torch.cat([a.targets, b.targets]), extra)

    def metrics(self, logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        return self.phase1.metrics(logits, batch)
