"""Zoology's multi-query associative recall, `multiquery_ar` (Arora, Eyuboglu et al., 2023), as published.

Layout of one example (V = vocab_size, L = seq_len, n = num_kv_pairs, P = num_passes, C = 2nP):

    k1 v1 k2 v2 ... kn vn  (repeated P times) | L - C query-region tokens

- keys are n distinct tokens of [1, V // 2), values n distinct tokens of [V // 2, V); token 0 is filler.
- every key is queried exactly once in the query region, at offset 2g from its start, where the gap slots g
  are n distinct draws from range(space), space = (L - C) / 2, drawn one after another without replacement with
  probability proportional to (g + 1) ** (power_a - 1): a power law, so most queries come soon after the context
  (power_a = 1 gives uniform gaps). The i-th key of the context takes the i-th drawn slot.
- the position holding a query key is scored with that key's value; the value does not follow the query in the
  input (unlike our `mqar`), so nothing of the answer is ever visible.
- with random_non_queries, every filler 0 of the input becomes a uniform token of [0, V) (keys and values
  included); without it, the query region is 0 except at the queries.
- rules of the original: L even, V > L, and 2n(P + 1) <= L (4n <= L for one pass), which also leaves the
  n distinct gap slots the queries need.

Zoology builds fixed train and test sets (100k and 3k examples in its Figure 2); here batches are an endless
stream by default, and num_train_examples / num_test_examples fix a set as the MAD tasks do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blocks import ConfigError
from hybrids.training.tasks.base import IGNORE_INDEX, Batch, FixedSetTask, check_set_sizes, check_types, distinct


@dataclass
class MultiqueryARConfig:
    """Zoology's `multiquery_ar` parameters; seq_len is its input_seq_len."""

    vocab_size: int = 8192
    seq_len: int = 64
    num_kv_pairs: int = 8
    power_a: float = 0.01
    random_non_queries: bool = True
    num_passes: int = 1
    num_train_examples: int | None = None
    num_test_examples: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self, ints=("vocab_size", "seq_len", "num_kv_pairs", "num_passes", "seed"),
                    floats=("power_a",), bools=("random_non_queries",))
        check_set_sizes(self)
        if self.num_kv_pairs < 1 or self.num_passes < 1:
            raise ConfigError(f"multiquery_ar: num_kv_pairs and num_passes must be >= 1, got {self.num_kv_pairs} "
                              f"and {self.num_passes}")
        if self.power_a <= 0:
            raise ConfigError(f"multiquery_ar: power_a must be > 0 (1 = uniform gaps), got {self.power_a}")
        if self.seq_len % 2:
            raise ConfigError(f"multiquery_ar: seq_len must be even (key-value pairs and query slots are 2 tokens), "
                              f"got {self.seq_len}")
        need = 2 * self.num_kv_pairs * (self.num_passes + 1)
        if need > self.seq_len:
            raise ConfigError(f"multiquery_ar: {self.num_kv_pairs} pairs x {self.num_passes} pass(es) and their "
                              f"queries need seq_len >= {need}, got {self.seq_len}")
        if self.vocab_size <= self.seq_len:
            raise ConfigError(f"multiquery_ar: vocab_size must be > seq_len (Zoology's rule), got vocab_size "
                              f"{self.vocab_size} and seq_len {self.seq_len}")


class MultiqueryAR(FixedSetTask):
    """Zoology's multi-query associative recall; the layout is in the module docstring."""

    name = "multiquery_ar"
    config_cls = MultiqueryARConfig

    def __init__(self, config: MultiqueryARConfig):
        super().__init__(config)
        half = config.vocab_size // 2
        self.key_ids = range(1, half)
        self.value_ids = range(half, config.vocab_size)
        self.context_len = 2 * config.num_kv_pairs * config.num_passes
        self.space = (config.seq_len - self.context_len) // 2

    def gap_probabilities(self) -> torch.Tensor:
        """(space,) float64: the probability of gap slot g for the first key drawn, proportional to
        (g + 1) ** (power_a - 1)."""
        p = torch.arange(1, self.space + 1, dtype=torch.float64) ** (self.config.power_a - 1)
        return p / p.sum()

    def examples(self, seed: int, count: int, training: bool) -> Batch:
        c = self.config
        gen = torch.Generator().manual_seed(seed)
        n, B, L = c.num_kv_pairs, count, c.seq_len
        keys = self.key_ids.start + distinct(gen, B, len(self.key_ids), n)  # (B, n)
        values = self.value_ids.start + distinct(gen, B, len(self.value_ids), n)  # (B, n)
        # Gumbel top-k: sorted by perturbed log-probability, it is the order of draws one after another without
        # replacement, so slot i is what the i-th weighted draw would give (numpy's choice(replace=False, p=p))
        u = torch.rand(B, self.space, generator=gen, dtype=torch.float64).clamp_min(1e-300)
        gumbel = self.gap_probabilities().log() - (-u.log()).log()  # (B, space)
        slots = gumbel.topk(n, dim=1).indices  # (B, n) in draw order
        pos = self.context_len + 2 * slots  # (B, n) positions of the query keys
        input_ids = torch.zeros(B, L, dtype=torch.int64)
        pairs = torch.stack([keys, values], dim=2).reshape(B, 2 * n)  # (B, 2n): k1 v1 k2 v2 ...
        input_ids[:, : self.context_len] = pairs.repeat(1, c.num_passes)
        input_ids.scatter_(1, pos, keys)
        if c.random_non_queries:
            noise = torch.randint(c.vocab_size, (B, L), generator=gen)
            input_ids = torch.where(input_ids == 0, noise, input_ids)
        targets = torch.full((B, L), IGNORE_INDEX, dtype=torch.int64)
        targets.scatter_(1, pos, values)
        return Batch(input_ids, targets, {})
