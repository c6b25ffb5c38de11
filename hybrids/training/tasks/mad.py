"""The six MAD tasks (Poli et al., 2024, athms/mad-lab) as published, with MAD's baseline settings as defaults.

Every task has a fixed train set of `num_train_examples` examples repeated over epochs and a fixed test set of
`num_test_examples` (1,280) used for validation (base.FixedSetTask). V = vocab_size, L = seq_len below.

- in_context_recall / noisy_in_context_recall: with S = V - noise_vocab_size (V - 1 - noise_vocab_size without
  multi_query), keys are [0, S // 2), values [S // 2, S), noise [S, S + noise_vocab_size). L / 2 - 1 slots, each
  a noise pair (probability frac_noise; one random slot is never noise) of two uniform noise tokens, or a
  `key value` pair: a uniform key, whose value is drawn uniformly the first time the key appears in the sequence
  and repeated after. Then a final probe: a uniform choice among the keys shown, and its value (without
  multi_query, a copy-prefix token V - 1 comes before it). Train targets are the next token everywhere; test
  targets are only the values of keys shown before (multi_query) or only the probe's value. MAD drops the last
  token, so sequences hold L - 1 tokens with multi_query and L without.
- fuzzy_in_context_recall: as recall, but a key is 1..k_motif_size distinct key tokens and a value 1..v_motif_size
  distinct value tokens (train; test keys always have k_motif_size tokens), S = V - 1 (V - 2 without
  multi_query; V - 1 pads, V - 2 pads without it), pairs are added while the sequence is shorter than
  L - |probe| - (k_motif_size + v_motif_size), the probe pair is placed once a random position is passed, and the
  sequence is left-padded to L tokens (pads are train targets, as in MAD).
- selective_copying: data tokens [0, V - 2), blank V - 2, copy token V - 1. The N = num_tokens_to_copy data tokens,
  with L - 2N - 1 blanks spread before them (each blank precedes a uniformly chosen data token, so the last data
  token is never followed by a blank), then the copy token, then N blanks whose targets are the data tokens.
- memorization: keys [0, K), values [K, V - 1) with K = (V - 1) // 2, insert token V - 1; one fixed key -> value
  map (distinct values) per seed for the whole data set. L / 2 pairs `key insert`, the insert token scored with
  the key's value, which never appears in the input: the map must be learned into the weights.
- compression: L - 1 uniform tokens of [0, V - 1) and a compression token V - 1, to be reconstructed. MAD trains
  it with an autoencoder backbone: the encoder reads the L tokens, its last position is pooled into one vector,
  and an MLP decoder predicts all L tokens from that vector plus position embeddings. A causal LM has no pooled
  bottleneck, so here the task is `x1 .. x(L-1) C | C x (L - 1)`, 2L - 1 tokens: the compression token's
  position is scored with x1 and the j-th following C with token j + 1 of the original (the last with C
  itself), the L targets MAD scores, with nothing of the answer in the input. A recurrent model must carry the
  sequence through its state at C, as MAD's encoder must through its pooled vector; attention can instead look
  back at the tokens, so for attention this measures copying rather than compression: compare it across
  architectures with that in mind, not with MAD's published compression numbers.

Where this differs from mad-lab, knowingly: a slot draw in which every recall pair is noise (possible in MAD only
when its guaranteed slot is the final probe's, and then MAD fails) makes the first slot a key-value pair;
selective copying draws its blanks from the task's seed (mad-lab uses numpy's unseeded global generator);
random draws are torch's (and numpy's for fuzzy recall), so examples match MAD's in distribution, not bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from blocks import ConfigError
from hybrids.training.tasks.base import IGNORE_INDEX, Batch, FixedSetTask, check_set_sizes, check_types, stream_seed


@dataclass
class MADSetConfig:
    """Fields every MAD task has (MADConfig's defaults: 12,800 train and 1,280 test examples)."""

    vocab_size: int = 16
    seq_len: int = 128
    num_train_examples: int | None = 12_800
    num_test_examples: int | None = 1_280
    seed: int = 0

    def check(self, task: str, ints: tuple[str, ...] = (), floats: tuple[str, ...] = (),
              bools: tuple[str, ...] = ()) -> None:
        check_types(self, ints=("vocab_size", "seq_len", "seed", *ints), floats=floats, bools=bools)
        check_set_sizes(self)
        for name in ("vocab_size", "seq_len", *ints):
            if name != "seed" and getattr(self, name) < 0:
                raise ConfigError(f"{task}: {name} must be >= 0, got {getattr(self, name)}")


@dataclass
class RecallConfig(MADSetConfig):
    """In-context recall (MAD baseline: vocab 16, seq 128, 12,800 train examples, multi_query)."""

    noise_vocab_size: int = 0
    frac_noise: float = 0.0
    multi_query: bool = True

    def __post_init__(self) -> None:
        name = self.task_name()
        self.check(name, ints=("noise_vocab_size",), floats=("frac_noise",), bools=("multi_query",))
        if self.seq_len % 2 or self.seq_len < 4:
            raise ConfigError(f"{name}: seq_len must be even and >= 4 (key-value pairs), got {self.seq_len}")
        if not 0 <= self.frac_noise < 1:
            raise ConfigError(f"{name}: frac_noise must be in [0, 1), got {self.frac_noise}")
        if self.frac_noise > 0 and self.noise_vocab_size == 0:
            raise ConfigError(f"{name}: frac_noise {self.frac_noise} needs noise_vocab_size > 0")
        specials = self.specials()
        if self.noise_vocab_size >= self.vocab_size:
            raise ConfigError(f"{name}: noise_vocab_size {self.noise_vocab_size} must be smaller than vocab_size "
                              f"{self.vocab_size}")
        least = self.least_symbols() + self.noise_vocab_size + specials
        if self.vocab_size < least:
            raise ConfigError(f"{name}: vocab_size {self.vocab_size} leaves too few key and value tokens after "
                              f"{self.noise_vocab_size} noise and {specials} special token(s); use vocab_size >= "
                              f"{least}")

    def task_name(self) -> str:
        return "in_context_recall"

    def specials(self) -> int:
        return 0 if self.multi_query else 1  # the copy prefix

    def least_symbols(self) -> int:
        return 2  # one key and one value

    def symbols(self) -> int:
        """S: the key + value vocabulary."""
        return self.vocab_size - self.specials() - self.noise_vocab_size


@dataclass
class NoisyRecallConfig(RecallConfig):
    """Noisy in-context recall (MAD baseline: vocab 32 with 16 noise tokens, frac_noise 0.2)."""

    vocab_size: int = 32
    noise_vocab_size: int = 16
    frac_noise: float = 0.2

    def task_name(self) -> str:
        return "noisy_in_context_recall"


@dataclass
class FuzzyRecallConfig(RecallConfig):
    """Fuzzy in-context recall (MAD baseline: vocab 16, seq 128, key and value motifs of up to 3 tokens)."""

    k_motif_size: int = 3
    v_motif_size: int = 3

    def __post_init__(self) -> None:
        check_types(self, ints=("k_motif_size", "v_motif_size"))
        if self.k_motif_size < 1 or self.v_motif_size < 1:
            raise ConfigError(f"fuzzy_in_context_recall: k_motif_size and v_motif_size must be >= 1, got "
                              f"{self.k_motif_size} and {self.v_motif_size}")
        super().__post_init__()
        need = 2 * (self.k_motif_size + self.v_motif_size) + 1
        if self.seq_len < need:
            raise ConfigError(f"fuzzy_in_context_recall: motifs of {self.k_motif_size} + {self.v_motif_size} "
                              f"tokens need seq_len >= {need}, got {self.seq_len}")

    def task_name(self) -> str:
        return "fuzzy_in_context_recall"

    def specials(self) -> int:
        return 1 if self.multi_query else 2  # the pad token (and the copy prefix)

    def least_symbols(self) -> int:
        # S // 2 keys hold k_motif_size distinct tokens, S - S // 2 values hold v_motif_size
        return max(2 * self.k_motif_size, 2 * self.v_motif_size - 1)


@dataclass
class SelectiveCopyingConfig(MADSetConfig):
    """Selective copying (MAD baseline: vocab 16, seq 256, 16 tokens to copy)."""

    seq_len: int = 256
    num_tokens_to_copy: int = 16

    def __post_init__(self) -> None:
        self.check("selective_copying", ints=("num_tokens_to_copy",))
        if self.num_tokens_to_copy < 1:
            raise ConfigError(f"selective_copying: num_tokens_to_copy must be >= 1, got {self.num_tokens_to_copy}")
        if self.seq_len <= 2 * self.num_tokens_to_copy + 1:
            raise ConfigError(f"selective_copying: {self.num_tokens_to_copy} tokens to copy need seq_len > "
                              f"{2 * self.num_tokens_to_copy + 1} (the tokens, a blank, the copy token and the "
                              f"answer), got {self.seq_len}")
        if self.vocab_size < 3:
            raise ConfigError(f"selective_copying: vocab_size {self.vocab_size} leaves no data tokens besides the "
                              "blank and copy tokens; use vocab_size >= 3")


@dataclass
class CompressionConfig(MADSetConfig):
    """Compression (MAD baseline: vocab 16, seq 32)."""

    seq_len: int = 32

    def __post_init__(self) -> None:
        self.check("compression")
        if self.seq_len < 2 or self.vocab_size < 2:
            raise ConfigError(f"compression: needs seq_len >= 2 and vocab_size >= 2 (data tokens and the "
                              f"compression token), got seq_len {self.seq_len} and vocab_size {self.vocab_size}")


@dataclass
class MemorizationConfig(MADSetConfig):
    """Memorization (MAD baseline: vocab 256, seq 32, 256 train examples)."""

    vocab_size: int = 256
    seq_len: int = 32
    num_train_examples: int | None = 256

    def __post_init__(self) -> None:
        self.check("memorization")
        if self.seq_len % 2 or self.seq_len < 2:
            raise ConfigError(f"memorization: seq_len must be even and >= 2 (`key insert` pairs), got {self.seq_len}")
        if self.vocab_size < 3:
            raise ConfigError(f"memorization: vocab_size {self.vocab_size} leaves no keys and values besides the "
                              "insert token; use vocab_size >= 3")


def _shift(sequence: torch.Tensor, scored: torch.Tensor, training: bool) -> Batch:
    """MAD's (inputs[:-1], inputs[1:]) in training and (inputs[:-1], scored[1:]) at test time."""
    return Batch(sequence[:, :-1], (sequence if training else scored)[:, 1:].clone(), {})


class InContextRecall(FixedSetTask):
    """MAD's in-context recall; the layout is in the module docstring."""

    name = "in_context_recall"
    config_cls = RecallConfig

    def __init__(self, config: RecallConfig):
        super().__init__(config)
        self.seq_len = config.seq_len - 1 if config.multi_query else config.seq_len
        S = config.symbols()
        self.key_ids, self.value_ids = range(0, S // 2), range(S // 2, S)
        self.noise_ids = range(S, S + config.noise_vocab_size)
        self.copy_prefix_id = config.vocab_size - 1

    def examples(self, seed: int, count: int, training: bool) -> Batch:
        c = self.config
        gen = torch.Generator().manual_seed(seed)
        B, n = count, c.seq_len // 2 - 1  # n pair slots before the final probe
        K = len(self.key_ids)
        keep = torch.randint(n + 1, (B, 1), generator=gen)  # the slot never noise (n: the probe's, as in MAD)
        noise = (torch.rand(B, n, generator=gen) < c.frac_noise) & (torch.arange(n) != keep)
        noise[noise.all(dim=1), 0] = False
        keys = torch.randint(K, (B, n), generator=gen)
        # one value per key and sequence, drawn up front: the same as drawing it at the key's first appearance
        table = self.value_ids.start + torch.randint(len(self.value_ids), (B, K), generator=gen)  # (B, K)
        values = table.gather(1, keys)
        noise_tokens = self.noise_ids.start + torch.randint(max(c.noise_vocab_size, 1), (B, n, 2), generator=gen)
        pairs = torch.where(noise[..., None], noise_tokens, torch.stack([keys, values], dim=2))  # (B, n, 2)
        slot = torch.arange(n).expand(B, n)
        first = torch.full((B, K), n).scatter_reduce(1, keys, torch.where(noise, n, slot), "amin")  # (B, K)
        before = first.gather(1, keys) < slot  # (B, n): the key was shown in an earlier slot
        present = first < n  # (B, K)
        probe = (torch.rand(B, K, generator=gen) + present).argmax(dim=1, keepdim=True)  # uniform among shown
        probe_value = table.gather(1, probe)
        value_scored = torch.where(before & ~noise & c.multi_query, values, IGNORE_INDEX)
        scored = torch.stack([torch.full_like(keys, IGNORE_INDEX), value_scored], dim=2).reshape(B, 2 * n)
        parts, parts_scored = [pairs.reshape(B, 2 * n)], [scored]
        if not c.multi_query:
            parts.append(torch.full((B, 1), self.copy_prefix_id))
            parts_scored.append(torch.full((B, 1), IGNORE_INDEX))
        parts += [probe, probe_value]
        parts_scored += [torch.full((B, 1), IGNORE_INDEX), probe_value]
        return _shift(torch.cat(parts, dim=1), torch.cat(parts_scored, dim=1), training)


class NoisyInContextRecall(InContextRecall):
    """MAD's noisy in-context recall: in-context recall with noise pairs (baseline frac_noise 0.2)."""

    name = "noisy_in_context_recall"
    config_cls = NoisyRecallConfig


class _Uniforms:
    """Uniform floats of [0, 1) from a seeded numpy generator, handed out one by one from a block (a scalar
    numpy draw costs microseconds, and fuzzy recall builds its examples token by token, as MAD does)."""

    def __init__(self, seed: int, block: int = 4096):
        self.rng, self.block = np.random.default_rng(seed), block
        self.buffer: list[float] = []

    def next(self) -> float:
        if not self.buffer:
            self.buffer = self.rng.random(self.block).tolist()
        return self.buffer.pop()

    def below(self, n: int) -> int:
        """A uniform int of range(n)."""
        return min(int(self.next() * n), n - 1)


class FuzzyInContextRecall(FixedSetTask):
    """MAD's fuzzy in-context recall: keys and values are motifs of several tokens (module docstring)."""

    name = "fuzzy_in_context_recall"
    config_cls = FuzzyRecallConfig

    def __init__(self, config: FuzzyRecallConfig):
        super().__init__(config)
        S = config.symbols()
        self.key_ids, self.value_ids = range(0, S // 2), range(S // 2, S)
        self.noise_ids = range(S, S + config.noise_vocab_size)
        self.pad_id = config.vocab_size - 1 if config.multi_query else config.vocab_size - 2
        self.copy_prefix_id = config.vocab_size - 1

    def examples(self, seed: int, count: int, training: bool) -> Batch:
        rng = _Uniforms(seed)
        rows = [self._example(rng, training) for _ in range(count)]
        sequence = torch.tensor(np.stack([r[0] for r in rows]), dtype=torch.int64)
        scored = torch.tensor(np.stack([r[1] for r in rows]), dtype=torch.int64)
        return _shift(sequence, scored, training)

    def _motif(self, rng: _Uniforms, ids: range, size: int) -> tuple[int, ...]:
        """A uniform ordered draw of `size` distinct tokens: MAD's uniform choice among all permutations."""
        pool = list(ids)
        return tuple(pool.pop(rng.below(len(pool))) for _ in range(size))

    def _example(self, rng: _Uniforms, training: bool) -> tuple[np.ndarray, np.ndarray]:
        c = self.config
        L, kmax, vmax = c.seq_len, c.k_motif_size, c.v_motif_size

        def key_size() -> int:
            return 1 + rng.below(kmax) if training else kmax

        k_probe = self._motif(rng, self.key_ids, key_size())
        v_probe = self._motif(rng, self.value_ids, 1 + rng.below(vmax))
        probe_len = len(k_probe) + len(v_probe)
        probe_at = rng.below(L - 2 * probe_len)
        probe_added = False
        seen: dict[tuple[int, ...], tuple[int, ...]] = {}  # value of each key in this sequence
        shown: set[tuple[int, ...]] = set()
        tokens: list[int] = []
        scored: list[int] = []
        while len(tokens) < L - probe_len - (kmax + vmax):
            k_size, v_size = key_size(), 1 + rng.below(vmax)
            if len(tokens) >= probe_at and not probe_added:
                tokens += k_probe + v_probe
                scored += [IGNORE_INDEX] * probe_len
                seen[k_probe] = v_probe
                shown.add(k_probe)
                probe_added = True
                continue
            if c.frac_noise > 0 and rng.next() < c.frac_noise:
                tokens += [self.noise_ids.start + rng.below(len(self.noise_ids)) for _ in range(k_size + v_size)]
                scored += [IGNORE_INDEX] * (k_size + v_size)
                continue
            key = self._motif(rng, self.key_ids, k_size)
            if key == k_probe:
                value, probe_added = v_probe, True
            elif key in seen:
                value = seen[key]
            else:
                value = self._motif(rng, self.value_ids, v_size)
            tokens += key + value
            scored += [IGNORE_INDEX] * len(key)
            scored += list(value) if key in shown and c.multi_query else [IGNORE_INDEX] * len(value)
            seen[key] = value
            shown.add(key)
        if not c.multi_query:
            tokens.append(self.copy_prefix_id)
            scored.append(IGNORE_INDEX)
        tokens += k_probe + v_probe
        scored += [IGNORE_INDEX] * len(k_probe) + list(v_probe)
        pad = L + 1 - len(tokens)
        return np.array([self.pad_id] * pad + tokens), np.array([IGNORE_INDEX] * pad + scored)


class SelectiveCopying(FixedSetTask):
    """MAD's selective copying; the layout is in the module docstring. Train and test targets are the same."""

    name = "selective_copying"
    config_cls = SelectiveCopyingConfig

    def __init__(self, config: SelectiveCopyingConfig):
        super().__init__(config)
        self.data_ids = range(0, config.vocab_size - 2)
        self.blank_id, self.copy_id = config.vocab_size - 2, config.vocab_size - 1

    def examples(self, seed: int, count: int, training: bool) -> Batch:
        c = self.config
        gen = torch.Generator().manual_seed(seed)
        B, N, L = count, c.num_tokens_to_copy, c.seq_len
        blanks = L - 2 * N - 1
        data = torch.randint(len(self.data_ids), (B, N), generator=gen)
        slots = torch.randint(N, (B, blanks), generator=gen)  # the data token each blank precedes
        before = torch.zeros(B, N, dtype=torch.int64).scatter_add_(1, slots, torch.ones_like(slots))  # (B, N)
        pos = torch.arange(N) + before.cumsum(dim=1)  # (B, N)
        input_ids = torch.full((B, L), self.blank_id, dtype=torch.int64)
        input_ids.scatter_(1, pos, data)
        input_ids[:, N + blanks] = self.copy_id
        targets = torch.full((B, L), IGNORE_INDEX, dtype=torch.int64)
        targets[:, L - N :] = data
        return Batch(input_ids, targets, {})


class Compression(FixedSetTask):
    """MAD's compression data, scored as a causal LM reconstructs it (module docstring: what differs and why)."""

    name = "compression"
    config_cls = CompressionConfig

    def __init__(self, config: CompressionConfig):
        super().__init__(config)
        self.seq_len = 2 * config.seq_len - 1
        self.compression_id = config.vocab_size - 1

    def examples(self, seed: int, count: int, training: bool) -> Batch:
        c = self.config
        gen = torch.Generator().manual_seed(seed)
        L = c.seq_len
        original = torch.randint(c.vocab_size - 1, (count, L), generator=gen)
        original[:, -1] = self.compression_id  # MAD's input, and its autoencoder's target
        input_ids = torch.cat([original, torch.full((count, L - 1), self.compression_id)], dim=1)
        targets = torch.full((count, 2 * L - 1), IGNORE_INDEX, dtype=torch.int64)
        targets[:, L - 1 :] = original
        return Batch(input_ids, targets, {})


class Memorization(FixedSetTask):
    """MAD's memorization; the layout is in the module docstring. `value_of[k]` is key k's value."""

    name = "memorization"
    config_cls = MemorizationConfig

    def __init__(self, config: MemorizationConfig):
        super().__init__(config)
        K = (config.vocab_size - 1) // 2
        self.key_ids, self.value_ids = range(0, K), range(K, config.vocab_size - 1)
        self.insert_id = config.vocab_size - 1
        gen = torch.Generator().manual_seed(stream_seed(self.name, config.seed, "kv_map"))
        self.value_of = self.value_ids.start + torch.randperm(len(self.value_ids), generator=gen)[:K]  # (K,)

    def examples(self, seed: int, count: int, training: bool) -> Batch:
        gen = torch.Generator().manual_seed(seed)
        n = self.config.seq_len // 2
        keys = torch.randint(len(self.key_ids), (count, n), generator=gen)
        input_ids = torch.stack([keys, torch.full_like(keys, self.insert_id)], dim=2).reshape(count, 2 * n)
        targets = torch.stack([torch.full_like(keys, IGNORE_INDEX), self.value_of[keys]], dim=2)
        return Batch(input_ids, targets.reshape(count, 2 * n), {})


MAD_TASKS = (InContextRecall, FuzzyInContextRecall, NoisyInContextRecall, SelectiveCopying, Compression,
             Memorization)
