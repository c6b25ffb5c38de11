"""From a task config to batches: synthetic tasks, LM text, and the two-phase mix of both phases.

Every batch is a pure function of (config, split, index): the trainer asks for batch `global_step`,
so a resumed run sees exactly the data an uninterrupted run would have seen. With several processes
(DDP, FSDP) every rank builds the same global batch and trains on its own slice (`rank_slice`), so a run on
any number of GPUs sees the same data at each step.
"""

from __future__ import annotations

from typing import Any

import torch

from blocks import ConfigError
from hybrids.training.schedules import Schedule
from hybrids.training.tasks import Batch, Task
from hybrids.training.tasks import make_task as make_synthetic_task


def make_task(config: dict[str, Any], reset_at_boundaries: bool = True) -> Task:
    """A Task from its config dict: {"name": "mqar", ...} or {"name": "lm", "sources": [...], ...}.

    LM sources given as mappings make a weighted mixture (see hybrids.training.corpus).
    The source "stdlib" stands for the running Python's standard-library sources (offline real text),
    "stdlib/<package>" for one package of it (e.g. a curated phase-2 subset). reset_at_boundaries
    (`data.reset_at_boundaries`): LM batches carry document ids, so that no mixer's state crosses a document
    boundary; synthetic tasks hold one example per row and ignore it.
    """
    options = dict(config)
    name = options.pop("name")
    if name != "lm":
        return make_synthetic_task(name, **options)
    from hybrids.training.corpus import is_mixture, make_mixture
    from hybrids.training.text import make_text_task, stdlib_source

    if "reset_at_boundaries" in options:
        raise ConfigError("reset_at_boundaries is a data setting, not a task option: set data.reset_at_boundaries")
    sources = options.pop("sources", ["stdlib"])
    if is_mixture(sources):
        return make_mixture(sources, options, lambda s: _expand(s, stdlib_source()), reset_at_boundaries)
    sources = [_expand(s, stdlib_source()) for s in ([sources] if isinstance(sources, str) else sources)]
    return make_text_task(sources, reset_at_boundaries=reset_at_boundaries, **options)


def _expand(source: str, stdlib_glob: str) -> str:
    """"stdlib" -> the standard library's sources; "stdlib/json" -> that package's sources."""
    if source == "stdlib":
        return stdlib_glob
    if source.startswith("stdlib/"):
        return stdlib_glob.replace("**/*.py", source.removeprefix("stdlib/") + "/**/*.py")
    return source


def rank_slice(batch: Batch, rank: int, world_size: int) -> Batch:
    """Rank `rank`'s share of a global batch of B examples: rows [rank * B / W, (rank + 1) * B / W).

    Args:
        batch: the global batch, input_ids and targets (B, L), extra tensors (B, ...).
        rank, world_size: this process's global rank and the number of processes W; W must divide B.
    Returns:
        A Batch of B / W examples (views, no copies); the ranks' slices, in rank order, make up the batch.
    """
    size = batch.input_ids.shape[0]
    if size % world_size:
        raise ConfigError(f"trainer.batch_size = {size} (the global batch) must be a multiple of the number of "
                          f"processes ({world_size} = trainer.devices x trainer.num_nodes)")
    if world_size == 1:
        return batch
    per = size // world_size
    rows = slice(rank * per, (rank + 1) * per)
    doc_ids = batch.doc_ids[rows] if batch.doc_ids is not None else None
    return Batch(batch.input_ids[rows], batch.targets[rows], {k: v[rows] for k, v in batch.extra.items()}, doc_ids)


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
        doc_ids = None
        if a.doc_ids is not None or b.doc_ids is not None:  # a row without ids is one document
            doc_ids = torch.cat([t.doc_ids if t.doc_ids is not None else torch.zeros_like(t.input_ids) for t in (a, b)])
        return Batch(torch.cat([a.input_ids, b.input_ids]), torch.cat([a.targets, b.targets]), extra, doc_ids)

    def metrics(self, logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        return self.phase1.metrics(logits, batch)
