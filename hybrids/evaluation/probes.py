"""Long-context probes that need no download: phone-book retrieval and long-distance copy, at growing lengths,
each reported against the model's KV-cache and recurrent-state bytes at that length.

- phonebook: a text phone book ("Ada Quill: 555-0143" lines, names drawn from fixed syllables) filling the
  context, then one entry's name again; the example is a hit when the model predicts every token of that
  entry's number (teacher-forced argmax), wherever the entry sits (a needle at a uniformly random depth).
  Needs a text tokenizer whose ids fit the model (a model trained on text).
- long_copy: our long_copy task (hybrids.training.tasks.recall) with the copy `distance` filling the context;
  a hit is a number copied digit for digit. Its options (num_digits, vocab_size) follow a run trained on it.

Lengths double from `min_len` to `max_len`; the sweep stops at the first length the device cannot hold (out of
memory), so the last length reported is the longest that fits. Examples are scored in one forward pass,
right-padded (the causal model never sees the padding before a scored position).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from blocks import ConfigError
from hybrids.accounting import stats
from hybrids.model import HybridLM
from hybrids.training.tasks import IGNORE_INDEX, LongCopy
from hybrids.training.tasks.recall import LongCopyConfig

PROBES = ("phonebook", "long_copy")
SYLLABLES = ("ka", "lo", "mi", "ren", "sa", "to", "vi", "na", "qu", "el", "dor", "ba", "fi", "ju", "pe", "xo")


@dataclass
class ProbeResult:
    """One probe at one length: `accuracy` over `n` examples and the cache bytes a batch-1 decode holds."""

    probe: str
    seq_len: int
    accuracy: float
    n: int
    kv_cache_bytes: int
    state_bytes: int

    @property
    def cache_bytes(self) -> int:
        return self.kv_cache_bytes + self.state_bytes


def _name(rng: np.random.Generator) -> str:
    def word():
        return "".join(rng.choice(SYLLABLES, size=rng.integers(2, 4))).capitalize()
    return f"{word()} {word()}"


def phonebook_examples(encode, seq_len: int, n: int, seed: int) -> list[tuple[list[int], int]]:
    """n phone-book examples: (token ids of book + query + number, number of scored tokens at the end).

    Args:
        encode: str -> list of token ids. seq_len: the length each example fills (at most).
    """
    rng = np.random.default_rng([seed, seq_len])
    out = []
    for _ in range(n):
        entries: list[tuple[str, str]] = []
        names: set[str] = set()
        book: list[int] = []
        longest = 0  # the query and its answer are one line of the book again, less its newline
        while True:
            name, number = _name(rng), f"555-{rng.integers(0, 10_000):04d}"
            line = encode(f"{name}: {number}\n")
            if name in names:
                continue
            if len(book) + len(line) + max(longest, len(line)) > seq_len:
                break
            longest = max(longest, len(line))
            entries.append((name, number))
            names.add(name)
            book += line
        if not entries:
            raise ConfigError(f"phonebook: seq_len {seq_len} holds no entry; raise min_len")
        name, number = entries[rng.integers(len(entries))]
        query, answer = encode(f"{name}: "), encode(number)
        out.append(((book + query + answer)[-seq_len:], len(answer)))
    return out


def long_copy_batch(seq_len: int, n: int, seed: int, options: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(input_ids, targets) of n long_copy examples whose copy distance fills seq_len; None if it cannot."""
    digits = options.get("num_digits", 8)
    distance = seq_len - 2 * digits - 8
    if distance < 0:
        return None
    config = LongCopyConfig(num_digits=digits, distances=(distance,), seq_len=seq_len,
                            vocab_size=options.get("vocab_size", 64), seed=seed)
    batch = LongCopy(config).batch(0, n, "test")
    return batch.input_ids, batch.targets


def _padded(examples: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, targets), both (n, L): the last `k` tokens of each example are scored."""
    length = max(len(ids) for ids, _ in examples) - 1
    inputs = torch.zeros(len(examples), length, dtype=torch.long)
    targets = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, k) in enumerate(examples):
        ids = torch.tensor(ids)
        inputs[row, :len(ids) - 1] = ids[:-1]
        targets[row, len(ids) - 1 - k:len(ids) - 1] = ids[-k:]
    return inputs, targets


@torch.no_grad()
def hits(model: HybridLM, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(n,) bool: every scored position's argmax equals its target."""
    device = model.embed.weight.device
    out = []
    for start in range(0, len(inputs), batch_size):
        x, y = inputs[start:start + batch_size].to(device), targets[start:start + batch_size].to(device)
        correct = (model(x).argmax(-1) == y) | (y == IGNORE_INDEX)
        out.append(correct.all(dim=1).cpu())
    return torch.cat(out)


def lengths(min_len: int, max_len: int) -> list[int]:
    if min_len < 16 or max_len < min_len:
        raise ConfigError(f"probe lengths need 16 <= min_len <= max_len, got {min_len} and {max_len}")
    out = [min_len]
    while out[-1] * 2 <= max_len:
        out.append(out[-1] * 2)
    return out


def run_probes(model: HybridLM, names: list[str], encode=None, min_len: int = 64, max_len: int = 1024,
               n: int = 32, batch_size: int = 8, seed: int = 0, long_copy_options: dict | None = None,
               log=print) -> list[ProbeResult]:
    """Each probe in `names` at lengths min_len, 2 min_len, ... <= max_len, until one does not fit in memory.

    Args:
        model: the model, in eval mode. names: probes to run (see PROBES).
        encode: str -> token ids of the model's text tokenizer; None skips phonebook (said through `log`).
        n: examples per length. batch_size: examples per forward pass. seed: the examples' seed.
        long_copy_options: num_digits / vocab_size of a run trained on long_copy.
    Returns:
        One ProbeResult per probe and length run.
    """
    unknown = sorted(set(names) - set(PROBES))
    if unknown:
        raise ConfigError(f"unknown probe(s) {', '.join(unknown)}; probes: {', '.join(PROBES)}")
    options = dict(long_copy_options or {})
    options["vocab_size"] = min(options.get("vocab_size", 64), model.config.vocab_size)
    if options["vocab_size"] < 12 and "long_copy" in names:
        raise ConfigError(f"long_copy needs a vocabulary of 12 tokens at least; the model has "
                          f"{model.config.vocab_size}")
    dtype = model.embed.weight.dtype
    results = []
    for name in names:
        if name == "phonebook" and encode is None:
            log("phonebook: skipped, the model has no text tokenizer that fits its vocabulary")
            continue
        for seq_len in lengths(min_len, max_len):
            if name == "phonebook":
                batch = _padded(phonebook_examples(encode, seq_len, n, seed))
            else:
                batch = long_copy_batch(seq_len, n, seed, options)
                if batch is None:
                    continue
            try:
                hit = hits(model, *batch, batch_size)
            except torch.OutOfMemoryError:
                log(f"{name}: length {seq_len} does not fit in memory; stopping at {seq_len // 2}")
                break
            s = stats(model.config, seq_len=seq_len, batch=1, dtype=dtype)
            results.append(ProbeResult(name, seq_len, float(hit.float().mean()), len(hit), s.kv_cache_bytes,
                                       s.state_bytes))
    return results


def as_metrics(results: list[ProbeResult]) -> dict[str, float]:
    """{"probe/<name>/<seq_len>/accuracy": ..., ".../cache_bytes": ...} for MLflow and a study's objective."""
    out = {}
    for r in results:
        out[f"probe/{r.probe}/{r.seq_len}/accuracy"] = r.accuracy
        out[f"probe/{r.probe}/{r.seq_len}/cache_bytes"] = float(r.cache_bytes)
    return out


def rows(results: list[ProbeResult]) -> list[dict]:
    return [{**dataclasses.asdict(r), "cache_bytes": r.cache_bytes} for r in results]
