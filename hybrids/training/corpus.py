"""Corpora: several weighted sources in one LM task, and pre-tokenized token files as sources.

The LM task's `sources` is a mixture as soon as one entry is a mapping:

    sources:
      - stdlib                                   # a file, folder or glob (weight 1)
      - {path: data/books, weight: 3}            # text files, tokenized once into the shard cache
      - {tokens: data/train.bin, dtype: uint16}  # raw token ids (read in place); .npy files are copied once
      - {hf: roneneldan/TinyStories, split: train, text_field: text, max_bytes: 10000000, weight: 1}

(a list of plain strings stays one source: the files read as one stream). Each source is its own `TextTask`
(its own cache, split and keyed order) under the task's tokenizer, seq_len, val_fraction and seed. An HF dataset
is streamed once, when named, into the shard cache (up to max_bytes), so that resuming never depends on the hub.
Token files hold ids of the task's tokenizer; its separator token (256 for "byte") marks document ends.

Order: normalised weights are apportioned to PERIOD slots (largest remainder), and the slots are laid out by
smooth weighted round robin, so every source appears at its share, evenly spread. Window p of the mixture (batch
`index` holds p = index * B ... index * B + B - 1) is in slot p % PERIOD of cycle p // PERIOD; the slot's source s
has n_s slots per cycle, and the window is that source's window cycle * n_s + (rank of the slot among s's slots),
so every source walks its own epochs in its own keyed order and a batch is a pure function of its index.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blocks import ConfigError
from hybrids.training.tasks import Batch, Task
from hybrids.training.text import TextTask, make_text_task
from hybrids.training.tokenizer import load_tokenizer, resolve_sources, token_dtype, write_json

PERIOD = 1000  # slots per mixture cycle: weights are honoured to 1/PERIOD of the total
KINDS = ("path", "tokens", "hf")
SOURCE_KEYS = {"path": {"weight", "max_bytes"}, "tokens": {"weight", "dtype"},
               "hf": {"weight", "max_bytes", "split", "text_field"}}
SCAN_TOKENS = 1 << 24  # token files are checked for out-of-vocabulary ids this many at a time
TEXT_OPTIONS = ("tokenizer", "seq_len", "val_fraction", "seed", "cache_dir", "max_bytes")


def is_mixture(sources: Any) -> bool:
    """Whether an LM task's `sources` names a mixture (one entry or more is a mapping)."""
    return isinstance(sources, list | tuple) and any(isinstance(s, dict) for s in sources)


def parse_sources(sources: list) -> list[dict]:
    """Mixture entries as {kind: value, "weight": w, ...options}; a plain string is {"path": it, "weight": 1}.

    Raises:
        ConfigError: an entry with none or several of path/tokens/hf, an unknown key, a weight that is not a
            number >= 0, or weights that do not sum to a positive number.
    """
    out = []
    for i, entry in enumerate(sources):
        entry = {"path": entry} if isinstance(entry, str) else dict(entry) if isinstance(entry, dict) else None
        if entry is None:
            raise ConfigError(f"task.sources[{i}] must be a path or a mapping, got {sources[i]!r}")
        kinds = [k for k in KINDS if k in entry]
        if len(kinds) != 1:
            raise ConfigError(f"task.sources[{i}] needs exactly one of path, tokens, hf; got {entry}")
        unknown = set(entry) - {kinds[0]} - SOURCE_KEYS[kinds[0]]
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join(sorted(unknown))} in task.sources[{i}] ({kinds[0]} "
                              f"source); valid: {kinds[0]}, {', '.join(sorted(SOURCE_KEYS[kinds[0]]))}")
        weight = entry.setdefault("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"task.sources[{i}].weight must be a number >= 0, got {weight!r}")
        out.append(entry)
    total = sum(e["weight"] for e in out)
    if not out or total <= 0:
        raise ConfigError(f"the mixture's weights must sum to a positive number, got {total} "
                          f"({len(out)} source(s))")
    return out


def apportion(weights: list[float], period: int = PERIOD) -> list[int]:
    """Slots per cycle of `period` for each weight (largest remainder); every positive weight gets one at least.

    Raises:
        ConfigError: a positive weight below 1/period of the total.
    """
    total = sum(weights)
    exact = [w / total * period for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[:period - sum(counts)]:
        counts[i] += 1
    for i, (w, n) in enumerate(zip(weights, counts, strict=True)):
        if w > 0 and n == 0:
            raise ConfigError(f"task.sources[{i}].weight {w} is below 1/{period} of the total {total}: "
                              "raise it or drop the source")
    return counts


def slot_pattern(counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(source, rank), both (period,): smooth weighted round robin over `counts`, and each slot's rank among
    the slots of its source."""
    period = sum(counts)
    current = np.zeros(len(counts), dtype=np.int64)
    source = np.empty(period, dtype=np.int64)
    for slot in range(period):
        current += counts
        source[slot] = int(np.argmax(current))
        current[source[slot]] -= period
    rank = np.empty(period, dtype=np.int64)
    for s in range(len(counts)):
        rank[source == s] = np.arange(counts[s])
    return source, rank


def token_file_task(path: str, dtype: str = "uint16", tokenizer: str = "byte", seq_len: int = 256,
                    val_fraction: float = 0.05, seed: int = 0, cache_dir: str = "runs/data",
                    reset_at_boundaries: bool = True) -> TextTask:
    """A TextTask over a pre-tokenized file: raw ids (.bin, of `dtype`, read in place) or a 1-D integer .npy
    (copied once into the cache). The manifest records the file and that every id is below the vocabulary.

    Raises:
        ConfigError: a missing or empty file, a .npy that is not 1-D integers, or ids outside the tokenizer's
            vocabulary.
    """
    if seq_len < 1 or not 0 < val_fraction < 1:
        raise ConfigError(f"seq_len must be positive and val_fraction in (0, 1), got {seq_len} and {val_fraction}")
    tok = load_tokenizer(tokenizer)
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise ConfigError(f"no such token file: {path}")
    if file.suffix == ".npy":
        data = np.load(file, mmap_mode="r")
        if data.ndim != 1 or data.dtype.kind not in "iu":
            raise ConfigError(f"token file {path} must hold a 1-D integer array, got {data.ndim}-D {data.dtype}")
    else:
        try:
            dtype_ = np.dtype(dtype)
        except TypeError:
            raise ConfigError(f"token file {path}: unknown dtype {dtype!r} (uint16, uint32, int32, ...)") from None
        if file.stat().st_size % dtype_.itemsize:
            raise ConfigError(f"token file {path} is {file.stat().st_size} bytes, not a whole number of {dtype}")
        data = np.memmap(file, dtype=dtype_, mode="r") if file.stat().st_size else np.zeros(0, dtype_)
    if data.size == 0:
        raise ConfigError(f"token file {path} is empty: the corpus needs tokens")
    stat = file.stat()
    key = hashlib.sha256(json.dumps(["tokens", str(file), stat.st_size, stat.st_mtime_ns, str(data.dtype),
                                     tok.identity]).encode()).hexdigest()
    folder = Path(cache_dir).expanduser().resolve() / key
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
    else:
        manifest = _token_manifest(file, data, tok, key, folder)
    return TextTask(folder, manifest, tok, seq_len, val_fraction, seed, reset_at_boundaries)


def _token_manifest(file: Path, data: np.ndarray, tok, key: str, folder: Path) -> dict:
    """Checks the ids, copies a .npy into a shard, writes manifest.json into `folder`."""
    for start in range(0, data.size, SCAN_TOKENS):
        chunk = data[start:start + SCAN_TOKENS]
        low, high = int(chunk.min()), int(chunk.max())
        if low < 0 or high >= tok.vocab_size:
            bad = high if high >= tok.vocab_size else low
            raise ConfigError(f"token file {file} holds id {bad}, outside the tokenizer's vocabulary "
                              f"[0, {tok.vocab_size}); name the tokenizer that made it (task.tokenizer=...)")
    folder.mkdir(parents=True, exist_ok=True)
    dtype = data.dtype
    shard = str(file)
    if file.suffix == ".npy":
        dtype, shard = token_dtype(tok.vocab_size), "shard_00000.bin"
        tmp = folder / f".{shard}.{os.getpid()}.tmp"
        with open(tmp, "wb") as out:
            for start in range(0, data.size, SCAN_TOKENS):
                np.asarray(data[start:start + SCAN_TOKENS]).astype(dtype).tofile(out)
        os.replace(tmp, folder / shard)
    n_docs = 0 if tok.separator is None else sum(
        int((data[s:s + SCAN_TOKENS] == tok.separator).sum()) for s in range(0, data.size, SCAN_TOKENS))
    manifest = {"key": key, "format": 1, "token_file": str(file),
                "tokenizer": {"kind": tok.kind, "identity": tok.identity, "path": tok.path,
                              "vocab_size": tok.vocab_size, "separator": tok.separator},
                "dtype": np.dtype(dtype).name, "n_documents": n_docs,
                "shards": [{"file": shard, "n_tokens": int(data.size)}], "n_tokens": int(data.size), "splits": {}}
    write_json(folder / "manifest.json", manifest)
    return manifest


class MixtureTask(Task):
    """Next-token prediction on a weighted mixture of sources; the order is in the module docstring.

    Attributes:
        parts: one TextTask per source. sources: the parsed entries. counts: slots per cycle of each source.
    """

    name = "lm"

    def __init__(self, sources: list[dict], parts: list[TextTask]):
        self.sources, self.parts = sources, parts
        self.counts = apportion([s["weight"] for s in sources])
        self._source, self._rank = slot_pattern(self.counts)
        self.tokenizer = parts[0].tokenizer
        self.vocab_size = max(p.vocab_size for p in parts)
        self.seq_len = parts[0].seq_len

    def locate(self, index: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, window within that source), both (B,), of batch `index`'s rows."""
        pos = index * batch_size + np.arange(batch_size, dtype=np.int64)
        cycle, slot = np.divmod(pos, len(self._source))
        source = self._source[slot]
        return source, cycle * np.asarray(self.counts)[source] + self._rank[slot]

    def batch(self, index: int, batch_size: int, split: str = "train") -> Batch:
        source, window = self.locate(index, batch_size)
        rows = [self.parts[s].batch(w, 1, split) for s, w in zip(source.tolist(), window.tolist(), strict=True)]
        keys = set.intersection(*(set(r.extra) for r in rows))
        extra = {k: torch.cat([r.extra[k] for r in rows]) for k in keys}
        extra["source"] = torch.from_numpy(source)
        doc_ids = None
        if any(r.doc_ids is not None for r in rows):  # a row without ids is one document
            doc_ids = torch.cat([r.doc_ids if r.doc_ids is not None else torch.zeros_like(r.input_ids) for r in rows])
        return Batch(torch.cat([r.input_ids for r in rows]), torch.cat([r.targets for r in rows]), extra, doc_ids)

    def metrics(self, logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        return self.parts[0].metrics(logits, batch)

    def decode(self, ids):
        return self.tokenizer.decode(ids)

    def record(self) -> dict:
        """The mixture as run: each source, its weight, its realised share of windows, tokens and cache."""
        return {"period": len(self._source), "sources": [
            {**s, "share": n / len(self._source), "n_tokens": p.manifest["n_tokens"], "n_train": p.n_train,
             "n_val": p.n_val, "cache": str(p.folder)}
            for s, n, p in zip(self.sources, self.counts, self.parts, strict=True)]}

    def describe(self) -> str:
        """One line: "books:0.75,train.bin:0.25" (each source's file name or dataset and its share)."""
        return ",".join(f"{Path(str(s.get('path', s.get('tokens', s.get('hf'))))).name}:{n / len(self._source):g}"
                        for s, n in zip(self.sources, self.counts, strict=True))


def make_mixture(sources: list, options: dict[str, Any], expand=lambda s: s,
                 reset_at_boundaries: bool = True) -> MixtureTask:
    """A MixtureTask from the LM task's `sources` entries and its other options (see TEXT_OPTIONS).

    Args:
        sources: the entries (see the module docstring). options: tokenizer, seq_len, val_fraction, seed,
            cache_dir, max_bytes (the default of text sources). expand: maps a path ("stdlib") to files.
        reset_at_boundaries: each source's batches carry document ids (data.reset_at_boundaries).
    Raises:
        ConfigError: a bad entry or weights (see parse_sources), an unknown option, a missing path, an empty
            source, a token file with ids outside the vocabulary.
    """
    unknown = set(options) - set(TEXT_OPTIONS)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(sorted(unknown))} for a mixture of sources; valid: "
                          f"{', '.join(TEXT_OPTIONS)} (an HF dataset is a source: {{hf: name}})")
    entries = parse_sources(sources)
    common = {k: v for k, v in options.items() if k != "max_bytes"} | {"reset_at_boundaries": reset_at_boundaries}
    parts = []
    for i, entry in enumerate(entries):
        if "tokens" in entry:
            parts.append(token_file_task(entry["tokens"], entry.get("dtype", "uint16"), **common))
            continue
        paths = [expand(entry["path"])] if "path" in entry else []
        if paths and sum(f.stat().st_size for f in resolve_sources(paths)) == 0:
            raise ConfigError(f"task.sources[{i}] ({entry['path']}) is empty: its files hold no text")
        hf = {"hf_dataset": entry["hf"], "hf_split": entry.get("split", "train"),
              "hf_text_field": entry.get("text_field", "text")} if "hf" in entry else {}
        parts.append(make_text_task(paths, max_bytes=entry.get("max_bytes", options.get("max_bytes")), **hf,
                                    **common))
    return MixtureTask(entries, parts)
