"""The task protocol the trainer uses (Batch, Task), seeding, scoring, and the two kinds of synthetic task.

A batch is a pure function of (task config, split, index, batch_size): its random stream is seeded by
`batch_seed`, a BLAKE2 hash of (task name, seed, split, index), which is the same in every process and on every
machine (Python's `hash()` of a str is salted per process). Splits hash to unrelated streams; the examples
themselves can still coincide by chance when a task's space of examples is small.

Targets follow the causal-LM convention: `targets[b, t]` is the token to predict after reading `input_ids[b, :t+1]`,
IGNORE_INDEX (-100) where nothing is scored.

Two kinds of synthetic task:
- SyntheticTask: every batch is freshly generated (an endless stream), as our own tasks and Zoology's are used here.
- FixedSetTask: a fixed train set of `num_train_examples` examples repeated over epochs, as MAD trains, and a fixed
  test set of `num_test_examples` that serves the "val" and "test" splits. Train batch `s` holds positions
  [s*B, (s+1)*B) of the stream "epoch 0 in a shuffled order, epoch 1 in another shuffled order, ...", so it is
  still a pure function of the step; validation batch `i` holds test examples [i*B, (i+1)*B) modulo the set size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from blocks import ConfigError

IGNORE_INDEX = -100
SPLITS = ("train", "val", "test")
CHUNK = 256  # examples generated per seed when a fixed set is built: example i depends only on (seed, split, i)


@dataclass
class Batch:
    """One batch of a task.

    input_ids: (B, L) int64. targets: (B, L) int64, the token to predict after reading input_ids[:, :t+1],
    IGNORE_INDEX where not scored. extra: per-example tensors, e.g. {"distance": (B,) int64} for long_copy.
    doc_ids: (B, L) int64 document ids of packed rows (`blocks.ops.documents`), or None: one document per row.
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    doc_ids: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """The batch in page-locked host memory (a DataLoader with pin_memory=True calls this), from which a copy
        to the GPU with non_blocking=True does not stop the host."""
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn) -> Batch:
        extra = {k: fn(v) for k, v in self.extra.items()}
        doc_ids = fn(self.doc_ids) if self.doc_ids is not None else None
        return Batch(fn(self.input_ids), fn(self.targets), extra, doc_ids)


class Task:
    """What the trainer needs from a task: a vocabulary size, a sequence length, batches and metrics."""

    name: str
    vocab_size: int
    seq_len: int

    def batch(self, index: int, batch_size: int, split: str = "train") -> Batch:
        """Batch number `index` of `split`; the same arguments give identical tensors."""
        raise NotImplementedError

    def metrics(self, logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """Scalar metrics of `logits` (B, L, V) on `batch`: "accuracy" of the argmax over scored positions."""
        correct, scored = score(logits, batch)
        return {"accuracy": accuracy(correct, scored)}


def stream_seed(*parts: object) -> int:
    """A 63-bit BLAKE2 hash of `parts` joined by "/": the same in every process and on every machine."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def batch_seed(name: str, seed: int, split: str, index: int) -> int:
    """The generator seed of batch `index` of `split`: a 63-bit BLAKE2 hash, stable across processes.

    Raises:
        ConfigError: for a split that is not one of SPLITS.
    """
    check_split(split)
    return stream_seed(name, seed, split, index)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def score(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, scored), both (B, L) bool: argmax == target at scored positions, and where targets are scored."""
    if logits.shape[:2] != batch.targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(batch.targets.shape)}")
    targets = batch.targets.to(logits.device)
    scored = targets != IGNORE_INDEX
    return (logits.argmax(dim=-1) == targets) & scored, scored


def accuracy(correct: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Fraction of scored positions that are correct (0 when nothing is scored)."""
    return correct.sum().float() / scored.sum().clamp_min(1).float()


def sequence_correct(correct: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """(B,) bool: every scored position of the example is correct (False for an example with none scored)."""
    return (correct | ~scored).all(dim=1) & scored.any(dim=1)


def distinct(gen: torch.Generator, batch_size: int, population: int, k: int) -> torch.Tensor:
    """(B, k) int64: per row, k distinct draws from range(population) in random order (uniform over the
    ordered k-tuples of distinct values)."""
    if k * k > population:  # many draws from few values: a random permutation per row
        return torch.rand(batch_size, population, generator=gen).argsort(dim=1)[:, :k]
    # few draws from many values (Zoology's 8 keys of 4096): draw rows with replacement and redraw every row
    # that repeats a value; a row survives with probability >= ~0.6, and O(B k) beats a (B, population) sort
    out = torch.randint(population, (batch_size, k), generator=gen)
    while True:
        ordered = out.sort(dim=1).values
        repeats = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1).nonzero().flatten()
        if len(repeats) == 0:
            return out
        out[repeats] = torch.randint(population, (len(repeats), k), generator=gen)


def check_types(config: Any, ints: tuple[str, ...] = (), floats: tuple[str, ...] = (),
                bools: tuple[str, ...] = ()) -> None:
    """Raise ConfigError for a config field of the wrong type; an int given for a float field becomes a float."""
    for name in ints:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{name} must be an int, got {value!r}")
    for name in floats:
        value = getattr(config, name)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        setattr(config, name, float(value))
    for name in bools:
        if not isinstance(getattr(config, name), bool):
            raise ConfigError(f"{name} must be true or false, got {getattr(config, name)!r}")


class SyntheticTask(Task):
    """A task built from a config dataclass with a `seed`; subclasses generate from a seeded generator."""

    config_cls: ClassVar[type]

    def __init__(self, config: Any):
        self.config = config
        self.vocab_size = config.vocab_size
        self.seq_len = config.seq_len

    def batch(self, index: int, batch_size: int, split: str = "train") -> Batch:
        check_batch_size(batch_size)
        gen = torch.Generator().manual_seed(batch_seed(self.name, self.config.seed, split, index))
        return self.generate(gen, batch_size)

    def generate(self, gen: torch.Generator, batch_size: int) -> Batch:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")


class FixedSetTask(SyntheticTask):
    """A task with a fixed train set repeated over epochs and a fixed test set (see the module docstring).

    The config needs `num_train_examples` and `num_test_examples` (None: an endless stream for that set).
    Subclasses implement `examples(seed, count, training)`: `count` examples from one seed, with the targets
    the published task scores in training (training=True) or at test time.
    """

    def __init__(self, config: Any):
        super().__init__(config)
        self._sets: dict[str, Batch] = {}

    def examples(self, seed: int, count: int, training: bool) -> Batch:
        raise NotImplementedError

    def batch(self, index: int, batch_size: int, split: str = "train") -> Batch:
        check_split(split)
        check_batch_size(batch_size)
        training = split == "train"
        size = self.config.num_train_examples if training else self.config.num_test_examples
        if size is None:
            return self.examples(batch_seed(self.name, self.config.seed, split, index), batch_size, training)
        if training:
            rows = self.train_rows(index, batch_size)
        else:
            rows = (index * batch_size + torch.arange(batch_size)) % size
        data = self.fixed_set("train" if training else "test")
        return Batch(data.input_ids[rows].long(), data.targets[rows].long(), {})

    def train_rows(self, index: int, batch_size: int) -> torch.Tensor:
        """(B,) int64: which train examples batch `index` holds (each epoch in its own shuffled order)."""
        size = self.config.num_train_examples
        stream = index * batch_size + torch.arange(batch_size)  # positions in the endless epoch stream
        epochs = stream // size
        rows = torch.empty(batch_size, dtype=torch.int64)
        for epoch in epochs.unique().tolist():
            gen = torch.Generator().manual_seed(stream_seed(self.name, self.config.seed, "epoch", epoch))
            order = torch.randperm(size, generator=gen)
            here = epochs == epoch
            rows[here] = order[stream[here] % size]
        return rows

    def fixed_set(self, which: str) -> Batch:
        """The whole fixed "train" or "test" set, built on first use and kept (int16/int32 to save memory)."""
        if which not in self._sets:
            size = self.config.num_train_examples if which == "train" else self.config.num_test_examples
            parts = [self.examples(stream_seed(self.name, self.config.seed, which, "chunk", c), CHUNK,
                                   which == "train") for c in range(-(-size // CHUNK))]
            dtype = torch.int16 if self.vocab_size < 2**15 else torch.int32
            self._sets[which] = Batch(torch.cat([p.input_ids for p in parts])[:size].to(dtype),
                                      torch.cat([p.targets for p in parts])[:size].to(dtype), {})
        return self._sets[which]


def check_set_sizes(config: Any) -> None:
    """num_train_examples / num_test_examples: a positive int or None (an endless stream)."""
    for name in ("num_train_examples", "num_test_examples"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{name} must be a positive int or null (an endless stream), got {value!r}")
