"""Our own synthetic recall tasks, generated on the fly from a seed: MQAR, selective copying, long-distance copy.

The published generators under their original names live beside these (zoology.py: multiquery_ar; mad.py: the
six MAD tasks). Seeding and the causal-LM target convention are described in base.py. Token layouts
(V = vocab_size, n/N/D as in each config):

- mqar: 0 filler, keys [1, 1 + K), values [1 + K, V) with K = (V - 1) // 2.
  `k1 v1 k2 v2 ... kn vn | tail`: n distinct keys, n distinct values. The tail (seq_len - 2n tokens) is filler
  with num_queries query pairs `k v` at random, non-overlapping even offsets (Zoology's layout, with uniform
  instead of power-law gaps). The position holding a query key is scored with its value; the value also follows
  it in the input, as in language. Queried keys are a random permutation of the n keys, repeated when
  num_queries > n, so each key is asked at most once when num_queries <= n.
- selective_copy: 0 noise, data tokens [1, V - 1), V - 1 separator.
  `context (seq_len - N tokens: N data tokens at random sorted positions, noise elsewhere) | SEP x N`.
  The j-th separator is scored with the j-th data token (the Mamba paper's task, as in the s4 repository's
  `torch_copying_data`: the answer region holds only separators, so nothing of the answer leaks into the input).
- long_copy: 0 query marker, digit i is token 1 + i, filler [11, V).
  `filler | d1 ... dD | distance filler tokens | MARKER d1 ... d(D-1) | filler`: the marker is scored with d1 and
  the copy is teacher-forced (digit i of the copy is scored with digit i + 1), so D positions are scored.
  The marker sits at a uniformly random position that leaves room for the number and the copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blocks import ConfigError
from hybrids.training.tasks.base import (
    IGNORE_INDEX,
    Batch,
    SyntheticTask,
    accuracy,
    check_types,
    distinct,
    score,
    sequence_correct,
)


@dataclass
class MQARConfig:
    """Multi-query associative recall (Zoology). num_queries: None = num_kv_pairs."""

    num_kv_pairs: int = 8
    vocab_size: int = 128
    seq_len: int = 64
    num_queries: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_queries is None:
            self.num_queries = self.num_kv_pairs
        check_types(self, ints=("num_kv_pairs", "vocab_size", "seq_len", "num_queries", "seed"))
        if self.num_kv_pairs < 1 or self.num_queries < 1:
            raise ConfigError(f"mqar: num_kv_pairs and num_queries must be >= 1, got {self.num_kv_pairs} "
                              f"and {self.num_queries}")
        num_keys = (self.vocab_size - 1) // 2
        if self.num_kv_pairs > num_keys:
            raise ConfigError(f"mqar: {self.num_kv_pairs} distinct keys do not fit in vocab_size {self.vocab_size} "
                              f"(1 filler token, {num_keys} keys, {self.vocab_size - 1 - num_keys} values); "
                              f"use vocab_size >= {2 * self.num_kv_pairs + 1}")
        need = 2 * (self.num_kv_pairs + self.num_queries)
        if need > self.seq_len:
            raise ConfigError(f"mqar: {self.num_kv_pairs} pairs and {self.num_queries} queries take {need} tokens, "
                              f"more than seq_len {self.seq_len}")


class MQAR(SyntheticTask):
    """Multi-query associative recall; the layout is in the module docstring."""

    name = "mqar"
    config_cls = MQARConfig
    filler_id = 0

    def __init__(self, config: MQARConfig):
        super().__init__(config)
        num_keys = (config.vocab_size - 1) // 2
        self.key_ids = range(1, 1 + num_keys)
        self.value_ids = range(1 + num_keys, config.vocab_size)

    def generate(self, gen: torch.Generator, batch_size: int) -> Batch:
        c = self.config
        n, q, B = c.num_kv_pairs, c.num_queries, batch_size
        keys = self.key_ids.start + distinct(gen, B, len(self.key_ids), n)  # (B, n)
        values = self.value_ids.start + distinct(gen, B, len(self.value_ids), n)  # (B, n)
        reps = -(-q // n)
        which = torch.rand(B, reps, n, generator=gen).argsort(dim=-1).reshape(B, reps * n)[:, :q]  # (B, q)
        slots = distinct(gen, B, (c.seq_len - 2 * n) // 2, q)  # (B, q)
        pos = 2 * n + 2 * slots  # (B, q) positions of the query keys
        query_values = values.gather(1, which)
        input_ids = torch.full((B, c.seq_len), self.filler_id, dtype=torch.int64)
        input_ids[:, 0 : 2 * n : 2] = keys
        input_ids[:, 1 : 2 * n : 2] = values
        input_ids.scatter_(1, pos, keys.gather(1, which))
        input_ids.scatter_(1, pos + 1, query_values)
        targets = torch.full((B, c.seq_len), IGNORE_INDEX, dtype=torch.int64)
        targets.scatter_(1, pos, query_values)
        return Batch(input_ids, targets, {})


@dataclass
class SelectiveCopyConfig:
    """Selective copying (Mamba paper): num_tokens data tokens among noise, then copy them in order."""

    num_tokens: int = 16
    vocab_size: int = 32
    seq_len: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self, ints=("num_tokens", "vocab_size", "seq_len", "seed"))
        if self.num_tokens < 1:
            raise ConfigError(f"selective_copy: num_tokens must be >= 1, got {self.num_tokens}")
        if self.vocab_size < 3:
            raise ConfigError(f"selective_copy: vocab_size {self.vocab_size} leaves no data tokens "
                              "besides noise and separator; use vocab_size >= 3")
        if 2 * self.num_tokens > self.seq_len:
            raise ConfigError(f"selective_copy: {self.num_tokens} tokens need a context of at least as many tokens "
                              f"and as many answer positions: seq_len >= {2 * self.num_tokens}, got {self.seq_len}")


class SelectiveCopy(SyntheticTask):
    """Selective copying; the layout is in the module docstring."""

    name = "selective_copy"
    config_cls = SelectiveCopyConfig
    noise_id = 0

    def __init__(self, config: SelectiveCopyConfig):
        super().__init__(config)
        self.data_ids = range(1, config.vocab_size - 1)
        self.separator_id = config.vocab_size - 1

    def generate(self, gen: torch.Generator, batch_size: int) -> Batch:
        c = self.config
        N, B = c.num_tokens, batch_size
        context = c.seq_len - N
        data = torch.randint(self.data_ids.start, self.data_ids.stop, (B, N), generator=gen)
        pos = distinct(gen, B, context, N).sort(dim=1).values  # (B, N)
        input_ids = torch.full((B, c.seq_len), self.noise_id, dtype=torch.int64)
        input_ids.scatter_(1, pos, data)
        input_ids[:, context:] = self.separator_id
        targets = torch.full((B, c.seq_len), IGNORE_INDEX, dtype=torch.int64)
        targets[:, context:] = data
        return Batch(input_ids, targets, {})

    def metrics(self, logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        correct, scored = score(logits, batch)
        return {"accuracy": accuracy(correct, scored),
                "sequence_accuracy": sequence_correct(correct, scored).float().mean()}


@dataclass
class LongCopyConfig:
    """Long-distance exact copy of a num_digits number.

    distance: the number of filler tokens between the last digit and the query marker (0 = adjacent); each
    example draws one of `distances` uniformly. seq_len: None = max(distances) + 2 * num_digits + 8 (the number,
    the copy after the marker, and 8 tokens of slack for the marker's random position).
    """

    num_digits: int = 8
    distances: tuple[int, ...] = (16, 32, 64)
    seq_len: int | None = None
    vocab_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.distances, int) or not hasattr(self.distances, "__iter__"):
            raise ConfigError(f"long_copy: distances must be a list of ints, got {self.distances!r}")
        self.distances = tuple(self.distances)
        if not self.distances or not all(isinstance(d, int) and not isinstance(d, bool) for d in self.distances):
            raise ConfigError(f"long_copy: distances must be a non-empty list of ints, got {list(self.distances)}")
        if min(self.distances) < 0 or len(set(self.distances)) != len(self.distances):
            raise ConfigError(f"long_copy: distances must be distinct and >= 0, got {list(self.distances)}")
        check_types(self, ints=("num_digits", "vocab_size", "seed"))
        if self.num_digits < 1:
            raise ConfigError(f"long_copy: num_digits must be >= 1, got {self.num_digits}")
        if self.seq_len is None:
            self.seq_len = max(self.distances) + 2 * self.num_digits + 8
        check_types(self, ints=("seq_len",))
        need = max(self.distances) + 2 * self.num_digits
        if self.seq_len < need:
            raise ConfigError(f"long_copy: distance {max(self.distances)} with {self.num_digits} digits and their "
                              f"copy needs seq_len >= {need}, got {self.seq_len}")
        if self.vocab_size < 12:
            raise ConfigError(f"long_copy: vocab_size {self.vocab_size} leaves no filler tokens besides the marker "
                              "and the 10 digits; use vocab_size >= 12")


class LongCopy(SyntheticTask):
    """Long-distance exact copy; the layout is in the module docstring. extra["distance"]: (B,) int64."""

    name = "long_copy"
    config_cls = LongCopyConfig
    marker_id = 0
    digit_ids = range(1, 11)

    def __init__(self, config: LongCopyConfig):
        super().__init__(config)
        self.filler_ids = range(11, config.vocab_size)

    def generate(self, gen: torch.Generator, batch_size: int) -> Batch:
        c = self.config
        D, B, L = c.num_digits, batch_size, c.seq_len
        distance = torch.tensor(c.distances)[torch.randint(len(c.distances), (B,), generator=gen)]  # (B,)
        lo, hi = distance + D, L - D  # inclusive range of the marker position
        marker = lo + (torch.rand(B, generator=gen, dtype=torch.float64) * (hi - lo + 1)).long()  # (B,)
        digits = torch.randint(self.digit_ids.start, self.digit_ids.stop, (B, D), generator=gen)
        offsets = torch.arange(D)
        input_ids = torch.randint(self.filler_ids.start, self.filler_ids.stop, (B, L), generator=gen)
        input_ids.scatter_(1, (marker - distance - D)[:, None] + offsets, digits)
        answer = marker[:, None] + offsets  # (B, D) scored positions
        input_ids.scatter_(1, marker[:, None], self.marker_id)
        input_ids.scatter_(1, answer[:, 1:], digits[:, :-1])
        targets = torch.full((B, L), IGNORE_INDEX, dtype=torch.int64)
        targets.scatter_(1, answer, digits)
        return Batch(input_ids, targets, {"distance": distance})

    def metrics(self, logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """accuracy, sequence_accuracy, and recall@{d}: sequence accuracy of the examples at distance d, for
        each distance present in the batch (absent ones are left out rather than reported as NaN)."""
        correct, scored = score(logits, batch)
        whole = sequence_correct(correct, scored)
        distance = batch.extra["distance"].to(whole.device)
        out = {"accuracy": accuracy(correct, scored), "sequence_accuracy": whole.float().mean()}
        for d in sorted(set(distance.tolist())):
            out[f"recall@{d}"] = whole[distance == d].float().mean()
        return out
