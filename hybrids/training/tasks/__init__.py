"""Synthetic tasks: the protocol the trainer uses (base.py), our own recall tasks (recall.py), Zoology's
`multiquery_ar` (zoology.py), the six MAD tasks (mad.py), and the registry that lists them by name."""

from hybrids.training.tasks.base import (
    IGNORE_INDEX,
    SPLITS,
    Batch,
    FixedSetTask,
    SyntheticTask,
    Task,
    accuracy,
    batch_seed,
    score,
    sequence_correct,
)
from hybrids.training.tasks.mad import (
    Compression,
    FuzzyInContextRecall,
    InContextRecall,
    Memorization,
    NoisyInContextRecall,
    SelectiveCopying,
)
from hybrids.training.tasks.recall import MQAR, LongCopy, SelectiveCopy
from hybrids.training.tasks.registry import TASKS, make_task, task_options
from hybrids.training.tasks.zoology import MultiqueryAR

__all__ = [
    "IGNORE_INDEX", "MQAR", "SPLITS", "TASKS", "Batch", "Compression", "FixedSetTask", "FuzzyInContextRecall",
    "InContextRecall", "LongCopy", "Memorization", "MultiqueryAR", "NoisyInContextRecall", "SelectiveCopy",
    "SelectiveCopying", "SyntheticTask", "Task", "accuracy", "batch_seed", "make_task", "score",
    "sequence_correct", "task_options",
]
