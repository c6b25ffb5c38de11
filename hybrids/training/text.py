"""Language modelling on text: a corpus tokenized once into cached shards (see tokenizer.py), cut into windows.

Split: the token stream (all shards, in order) is cut into blocks of seq_len + 1 tokens; the last
n_tokens % (seq_len + 1) tokens are unused. With val_fraction = num/den, block b is a validation block iff
floor((b + 1) num / den) > floor(b num / den): val blocks are spread evenly (every 20th for 0.05, starting at
block 19), so validation samples the whole corpus, and train and val windows never overlap.

Order: training window i (batch `index` holds windows index * B ... index * B + B - 1) lies in epoch
i // n_train at position i % n_train, and that position maps to a train block through a keyed permutation
of range(n_train) that depends only on (seed, epoch): a Feistel network with cycle walking, computed per
index, so no permutation is stored and a resumed run sees exactly the batches of an uninterrupted one.
Validation batches visit the val blocks in order; the last batch is filled with repeats scored -100.

Documents: the stream holds them back to back, each followed by the tokenizer's separator. With
reset_at_boundaries a batch carries doc_ids (B, L): a separator ends its document and the next token starts
a new one (as Megatron's reset_attention_mask counts an end-of-document token), so every mixer resets there.
The separator's own target, the next document's first token, stays scored.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import sysconfig
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from blocks import ConfigError
from hybrids.training.tasks import IGNORE_INDEX, Batch, Task, accuracy, score
from hybrids.training.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, tokenize_corpus, write_json

log = logging.getLogger(__name__)

MAX_LISTED_RANGES = 1000  # the manifest lists val token ranges explicitly up to this many
FEISTEL_ROUNDS = 6


def stdlib_source() -> str:
    """The glob of the running Python's standard-library sources: tens of MB of real text on every machine."""
    return os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py")


def _split_info(n_tokens: int, seq_len: int, val_fraction: float) -> dict:
    """The manifest's record of one split: the rule, its counts and the val token ranges."""
    num, den = _fraction(val_fraction)
    block = seq_len + 1
    n_blocks = n_tokens // block
    n_val = n_blocks * num // den
    info = {"rule": "block b = tokens [b*(seq_len+1), (b+1)*(seq_len+1)) is val iff "
                    "floor((b+1)*num/den) > floor(b*num/den)",
            "seq_len": seq_len, "val_fraction": val_fraction, "num": num, "den": den, "n_blocks": n_blocks,
            "n_train": n_blocks - n_val, "n_val": n_val, "val_token_ranges": None}
    if n_val <= MAX_LISTED_RANGES:
        ranges: list[list[int]] = []
        for b in _val_block(np.arange(n_val), num, den).tolist():
            if ranges and ranges[-1][1] == b * block:
                ranges[-1][1] += block
            else:
                ranges.append([b * block, (b + 1) * block])
        info["val_token_ranges"] = ranges
    return info


def _fraction(val_fraction: float) -> tuple[int, int]:
    f = Fraction(str(val_fraction)).limit_denominator(1_000_000)
    return f.numerator, f.denominator


def _val_block(v: np.ndarray, num: int, den: int) -> np.ndarray:
    """Block of the v-th val block: where floor((b + 1) num / den) first reaches v + 1."""
    return -((-(v + 1) * den) // num) - 1


def _train_block(t: np.ndarray, num: int, den: int) -> np.ndarray:
    """Block of the t-th train block: the smallest b with (b + 1) - floor((b + 1) num / den) == t + 1."""
    def n_train(b):
        return b + 1 - (b + 1) * num // den

    b = -((-(t + 1) * den) // (den - num)) - 1  # n_train(b) is within 1 of t + 1 here
    while (low := n_train(b) < t + 1).any():
        b = b + low
    while (high := (b > 0) & (n_train(b - 1) >= t + 1)).any():
        b = b - high
    return b


@lru_cache(maxsize=64)
def _round_keys(seed: int, epoch: int) -> tuple[int, ...]:
    digests = (hashlib.sha256(f"text-order:{seed}:{epoch}:{r}".encode()).digest() for r in range(FEISTEL_ROUNDS))
    return tuple(int.from_bytes(d[:8], "little") for d in digests)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijective scramble of uint64 values."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


def permute(positions: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """Images of `positions` (each in [0, n)) under the (seed, epoch) permutation of range(n)."""
    half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = _round_keys(seed, epoch)

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> half, x & mask
        for key in keys:
            left, right = right, left ^ (_mix(right ^ np.uint64(key)) & mask)
        return (left << half) | right

    with np.errstate(over="ignore"):
        y = feistel(np.asarray(positions, dtype=np.uint64))
        while (outside := y >= n).any():  # cycle walking: the network permutes [0, 4^half) and n <= 4^half
            y[outside] = feistel(y[outside])
    return y.astype(np.int64)


class TextTask(Task):
    """Next-token prediction on a tokenized corpus; see the module docstring for the split and the order.

    Attributes:
        manifest: the cache's manifest.json. folder: the cache folder. tokenizer: decodes token ids.
        n_blocks, n_train, n_val: blocks of seq_len + 1 tokens in all, for training, for validation.
    """

    name = "lm"

    def __init__(self, folder: Path, manifest: dict, tokenizer: ByteTokenizer | HFTokenizer, seq_len: int,
                 val_fraction: float, seed: int, reset_at_boundaries: bool = True):
        self.folder, self.manifest, self.tokenizer = Path(folder), manifest, tokenizer
        self.separator = manifest["tokenizer"].get("separator") if reset_at_boundaries else None
        if reset_at_boundaries and self.separator is None:
            log.warning("the tokenizer has no end-of-document token: documents run together and no mixer resets "
                        "between them (data.reset_at_boundaries has nothing to act on)")
        self.vocab_size = manifest["tokenizer"]["vocab_size"]
        self.seq_len, self.val_fraction, self.seed = seq_len, val_fraction, seed
        split = _split_info(manifest["n_tokens"], seq_len, val_fraction)
        self._num, self._den = split["num"], split["den"]
        self.n_blocks, self.n_train, self.n_val = split["n_blocks"], split["n_train"], split["n_val"]
        if self.n_blocks == 0:
            raise ConfigError(f"seq_len {seq_len} is larger than the data: a window needs {seq_len + 1} tokens, "
                              f"the corpus has {manifest['n_tokens']}")
        if self.n_val == 0:
            raise ConfigError(f"val split empty: {self.n_blocks} blocks of {seq_len + 1} tokens and val_fraction "
                              f"{val_fraction} give no val block; add data, lower seq_len or raise val_fraction")
        if self.n_train == 0:
            raise ConfigError(f"train split empty: {self.n_blocks} blocks of {seq_len + 1} tokens, all val "
                              f"(val_fraction {val_fraction})")
        self._starts = np.cumsum([0] + [s["n_tokens"] for s in manifest["shards"]])
        self._shards: list[np.memmap] | None = None
        _record_split(self.folder, manifest, split)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_shards": None}  # workers reopen the memmaps instead of pickling the data

    def offsets(self, index: int, batch_size: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """Token offsets of batch `index`'s windows (B,) and whether each is scored (repeats in the last
        val batch are not)."""
        pos = index * batch_size + np.arange(batch_size, dtype=np.int64)
        if split == "train":
            epoch, t = np.divmod(pos, self.n_train)
            for e in np.unique(epoch).tolist():
                t[epoch == e] = permute(t[epoch == e], self.n_train, self.seed, e)
            blocks, scored = _train_block(t, self._num, self._den), np.ones(batch_size, dtype=bool)
        elif split == "val":
            pos = pos % (self.val_batches(batch_size) * batch_size)
            blocks, scored = _val_block(pos % self.n_val, self._num, self._den), pos < self.n_val
        else:
            raise ConfigError(f"unknown split {split!r}; valid: train, val")
        return blocks * (self.seq_len + 1), scored

    def val_batches(self, batch_size: int) -> int:
        """Batches in one pass over the validation windows; batch indices beyond it wrap around."""
        return -(-self.n_val // batch_size)

    def batch(self, index: int, batch_size: int, split: str = "train") -> Batch:
        offsets, scored = self.offsets(index, batch_size, split)
        windows = torch.from_numpy(np.stack([self.read(o, self.seq_len + 1) for o in offsets.tolist()]))
        targets = windows[:, 1:].clone()  # (B, L)
        targets[torch.from_numpy(~scored)] = IGNORE_INDEX
        inputs = windows[:, :-1].contiguous()
        return Batch(inputs, targets, {"offset": torch.from_numpy(offsets)}, self.doc_ids(inputs))

    def doc_ids(self, inputs: torch.Tensor) -> torch.Tensor | None:
        """(B, L) int64: separators before each position (a separator closes its own document), or None when
        documents are not reset."""
        if self.separator is None:
            return None
        ends = inputs == self.separator
        return ends.long().cumsum(dim=1) - ends.long()

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the whole stream as int64, across shard boundaries."""
        if self._shards is None:
            dtype = np.dtype(self.manifest["dtype"])
            self._shards = [np.memmap(self.folder / s["file"], dtype=dtype, mode="r", shape=(s["n_tokens"],))
                            for s in self.manifest["shards"]]
        pieces, end = [], start + length
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        while start < end:
            stop = min(end, int(self._starts[shard + 1]))
            pieces.append(self._shards[shard][start - self._starts[shard]:stop - self._starts[shard]])
            start, shard = stop, shard + 1
        return np.concatenate(pieces).astype(np.int64)

    def decode(self, ids) -> bytes | str:
        """Token ids back to bytes (byte tokenizer) or text (HF tokenizer)."""
        return self.tokenizer.decode(ids)

    @torch.no_grad()
    def metrics(self, logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """accuracy: argmax next-token accuracy on scored positions. bits_per_byte (byte tokenizer only): the
        bits of all scored tokens (document separators included) per scored byte."""
        correct, scored = score(logits, batch)
        out = {"accuracy": accuracy(correct, scored)}
        if isinstance(self.tokenizer, ByteTokenizer):
            targets = batch.targets.to(logits.device)
            nats = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="sum")
            out["bits_per_byte"] = nats / math.log(2) / (scored & (targets < 256)).sum().clamp_min(1).float()
        return out


def _record_split(folder: Path, manifest: dict, split: dict) -> None:
    """Adds `split` to manifest.json's "splits" (atomic replace); a read-only cache is left as it is."""
    name = f"seq_len={split['seq_len']},val_fraction={split['val_fraction']}"
    if name in manifest.setdefault("splits", {}):
        return
    manifest["splits"][name] = split
    try:
        write_json(folder / "manifest.json", manifest)
    except OSError as err:
        log.warning("could not record split %s in %s: %s", name, folder, err)


def make_text_task(sources: list[str] | str, tokenizer: str = "byte", seq_len: int = 256,
                   val_fraction: float = 0.05, seed: int = 0, cache_dir: str = "runs/data",
                   hf_dataset: str | None = None, hf_split: str = "train", hf_text_field: str = "text",
                   max_bytes: int | None = None, reset_at_boundaries: bool = True) -> TextTask:
    """A language-modelling task over local text (and an HF dataset when named), tokenized once and cached.

    Args:
        sources: files, folders or globs ("dir/**/*.py"); see `tokenizer.resolve_sources`. May be empty with hf_dataset.
        tokenizer: "byte" (UTF-8 bytes + separator 256, vocab 257) or the path of an HF tokenizer.json.
        seq_len: tokens per example; windows hold seq_len + 1 tokens (inputs and shifted targets).
        val_fraction: share of blocks held out for validation, in (0, 1).
        seed: seeds the training order (a permutation per epoch).
        cache_dir: where the shards go, one folder per key.
        hf_dataset, hf_split, hf_text_field: an HF dataset read after the files (needs `datasets`; the only
            source that may touch the network). The key names it, not its contents: delete its cache
            folder to re-read a dataset that changed upstream.
        max_bytes: read at most this many bytes of text in all (files in path order, then records).
        reset_at_boundaries: batches carry document ids from the separators (see the module docstring).

    Returns:
        The TextTask.

    Raises:
        ConfigError: a source that matches nothing, an unreadable tokenizer file, an impossible seq_len,
            val_fraction or max_bytes, an empty train or val split, a missing `datasets` library.
    """
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    if seq_len < 1:
        raise ConfigError(f"seq_len must be positive, got {seq_len}")
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    if seed < 0:
        raise ConfigError(f"seed must be non-negative, got {seed}")
    if max_bytes is not None and max_bytes < 1:
        raise ConfigError(f"max_bytes must be positive or None, got {max_bytes}")
    if not sources and hf_dataset is None:
        raise ConfigError("no text sources given: name files, folders, globs or an hf_dataset")
    tok = load_tokenizer(tokenizer)
    hf = None if hf_dataset is None else {"name": hf_dataset, "split": hf_split, "text_field": hf_text_field}
    folder, manifest = tokenize_corpus(sources, tok, cache_dir, max_bytes, hf)
    return TextTask(folder, manifest, tok, seq_len, val_fraction, seed, reset_at_boundaries)
