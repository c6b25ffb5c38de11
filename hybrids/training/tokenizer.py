"""Tokenizing text once into a cache of memory-mapped shards, and the tokenizers that do it.

Tokenizers turn a document into a 1-D integer array; the end of every document gets a separator token,
so that the model sees where one file ends and the next begins:
- "byte": token t < 256 is the byte t; token 256 is the end-of-document separator; vocab 257.
- an HF tokenizer file: its own vocabulary (added tokens included); the separator is the first of
  `EOS_NAMES` that the vocabulary holds, or none (documents then simply abut).

Cache: `cache_dir/<key>/` holds shard_00000.bin, shard_00001.bin, ... (raw token ids, uint16 below a vocab of
65536 else uint32, at most SHARD_TOKENS each; read with np.memmap) and manifest.json. The key is the sha256 of
the files read (absolute path, size, mtime), the tokenizer identity ("byte" or the sha256 of the tokenizer
file), max_bytes and the HF dataset (name, split, field), so an edited file gives a new key and an unchanged
corpus is never tokenized twice. A build writes into a temporary folder renamed into place at the end: an
interrupted build leaves no manifest behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from blocks import ConfigError

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the shard or manifest layout changes: old caches then get new keys
SHARD_TOKENS = 1 << 26
ENCODE_BYTES = 1 << 22  # documents are handed to the tokenizer in groups of about this many bytes
BYTE_VOCAB = 257
BYTE_SEPARATOR = 256
EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[SEP]")
_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages"}
_MAGIC = re.compile(r"[*?[]")


class ByteTokenizer:
    """Bytes as tokens (0..255) plus the separator 256: a file's bytes are encoded as they are, never decoded."""

    kind = "byte"
    identity = "byte"
    vocab_size = BYTE_VOCAB
    separator: int | None = BYTE_SEPARATOR
    path: str | None = None

    def encode(self, documents: list[bytes]) -> list[np.ndarray]:
        """One uint16 array of byte tokens per document (no separator: the shard writer appends it)."""
        return [np.frombuffer(doc, dtype=np.uint8).astype(np.uint16) for doc in documents]

    def decode(self, ids, separator: bytes = b"\n\n") -> bytes:
        """The bytes of `ids`, each document separator written as `separator`."""
        ids = np.asarray(ids)
        parts = np.split(ids, np.flatnonzero(ids == BYTE_SEPARATOR))
        return separator.join(p[p != BYTE_SEPARATOR].astype(np.uint8).tobytes() for p in parts)


class HFTokenizer:
    """A `tokenizers.Tokenizer` loaded from a tokenizer.json file; documents are decoded as UTF-8 first
    (invalid bytes become U+FFFD) and encoded without the tokenizer's own special tokens."""

    kind = "hf"

    def __init__(self, path: str | Path):
        try:
            from tokenizers import Tokenizer
        except ImportError as err:
            raise ConfigError("a tokenizer file needs the tokenizers library: pip install tokenizers") from err
        path = Path(path).expanduser().resolve()
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise ConfigError(f"cannot read tokenizer file {path}: {err.strerror or err} "
                              '(tokenizer is "byte" or the path of a tokenizer.json)') from err
        try:
            self._tok = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ConfigError(f"cannot read tokenizer file {path}: not a tokenizer.json ({reason})") from err
        self.path = str(path)
        self.identity = hashlib.sha256(raw).hexdigest()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.separator = next((i for name in EOS_NAMES if (i := self._tok.token_to_id(name)) is not None), None)

    def encode(self, documents: list[bytes]) -> list[np.ndarray]:
        """One array of token ids per document (no separator: the shard writer appends it)."""
        texts = [doc.decode("utf-8", errors="replace") for doc in documents]
        return [np.asarray(e.ids, dtype=np.int64) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        """The text of `ids`, special tokens included."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(tokenizer: str) -> ByteTokenizer | HFTokenizer:
    """"byte" or the path of an HF tokenizer.json.

    Raises:
        ConfigError: a path that cannot be read or parsed as a tokenizer.
    """
    return ByteTokenizer() if tokenizer == "byte" else HFTokenizer(tokenizer)


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that stores every token id: uint16 below 65536, else uint32."""
    return np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)


@dataclass(frozen=True)
class SourceFile:
    path: str
    size: int
    mtime_ns: int
    bytes_read: int


def resolve_sources(sources: list[str]) -> list[Path]:
    """Absolute paths of the files that `sources` name, deduplicated and sorted by their string.

    A source is a file, a folder (every file below it) or a glob ("dir/**/*.py"; "**" spans folders). Folder
    walks skip hidden entries, __pycache__ and installed packages (site-packages, dist-packages) below the
    source's root, so the stdlib glob reads the standard library only.

    Raises:
        ConfigError: a source that matches no file.
    """
    files: set[Path] = set()
    for source in sources:
        matched = _expand(os.fspath(source))
        if not matched:
            raise ConfigError(f"no files matched source {source!r}")
        files.update(matched)
    return sorted(files, key=str)


def _expand(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if not _MAGIC.search(source):
        return [path.resolve()] if path.is_file() else _walk(path, None) if path.is_dir() else []
    parts = path.parts
    first = next(i for i, part in enumerate(parts) if _MAGIC.search(part))
    root = Path(*parts[:first]) if first else Path(".")
    return _walk(root, _glob_regex(parts[first:])) if root.is_dir() else []


def _walk(root: Path, pattern: re.Pattern | None) -> list[Path]:
    root = root.resolve()
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in _SKIP_DIRS]
        for name in names:
            path = Path(folder, name)
            if name.startswith(".") or not path.is_file():
                continue
            if pattern is None or pattern.fullmatch(path.relative_to(root).as_posix()):
                found.append(path.resolve())
    return found


def _glob_regex(parts: tuple[str, ...]) -> re.Pattern:
    """A regex for relative posix paths: "**" spans any number of folders, "*" and "?" stay in one name."""
    pieces = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            pieces.append(".*" if last else "(?:[^/]+/)*")
            continue
        rx, j = "", 0
        while j < len(part):
            c = part[j]
            end = part.find("]", j + 2) if c == "[" else -1
            if c == "*":
                rx += "[^/]*"
            elif c == "?":
                rx += "[^/]"
            elif end > 0:
                body = part[j + 1:end]
                rx += "[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]"
                j = end
            else:
                rx += re.escape(c)
            j += 1
        pieces.append(rx if last else rx + "/")
    return re.compile("".join(pieces))


def _plan_reads(files: list[Path], max_bytes: int | None) -> list[SourceFile]:
    """Files in path order with how much of each is read: all of it, until max_bytes runs out."""
    plan, budget = [], max_bytes
    for path in files:
        if budget is not None and budget <= 0:
            break
        stat = path.stat()
        take = stat.st_size if budget is None else min(stat.st_size, budget)
        plan.append(SourceFile(str(path), stat.st_size, stat.st_mtime_ns, take))
        budget = None if budget is None else budget - take
    return plan


def _cache_key(plan: list[SourceFile], tokenizer_identity: str, max_bytes: int | None,
               hf: dict | None) -> str:
    payload = {"format": FORMAT, "files": [[f.path, f.size, f.mtime_ns] for f in plan],
               "tokenizer": tokenizer_identity, "max_bytes": max_bytes, "hf_dataset": hf}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _documents(plan: list[SourceFile], hf: dict | None, max_bytes: int | None) -> Iterator[bytes]:
    """Every document's bytes: the planned files, then the HF dataset's records, within max_bytes in all."""
    budget = max_bytes
    for f in plan:
        with open(f.path, "rb") as fh:
            data = fh.read(f.bytes_read)
        budget = None if budget is None else budget - len(data)
        yield data
    if hf is None or (budget is not None and budget <= 0):
        return
    for text in _hf_texts(**hf):
        data = text.encode("utf-8")[:budget]
        yield data
        if budget is not None:
            budget -= len(data)
            if budget <= 0:
                return


def _hf_texts(name: str, split: str, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError as err:
        raise ConfigError(f"hf_dataset={name!r} needs the datasets library: pip install datasets") from err
    try:
        records = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as err:  # the hub, the builder and the file system each raise their own errors
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"cannot load HF dataset {name!r} (split {split!r}): {reason}") from err
    for record in records:
        if text_field not in record:
            raise ConfigError(f"HF dataset {name!r} has no field {text_field!r}; fields: {', '.join(record)}")
        if not isinstance(text := record[text_field], str):
            raise ConfigError(f"HF dataset {name!r} field {text_field!r} holds {type(text).__name__}, not text")
        yield text


class _ShardWriter:
    """Appends token ids to shard_00000.bin, shard_00001.bin, ... of at most `shard_tokens` tokens each."""

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int):
        self.folder, self.dtype, self.shard_tokens = folder, dtype, shard_tokens
        self.counts: list[int] = []
        self._file = None

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        while ids.size:
            if self._file is None or self.counts[-1] == self.shard_tokens:
                self._roll()
            take = min(ids.size, self.shard_tokens - self.counts[-1])
            ids[:take].tofile(self._file)
            self.counts[-1] += take
            ids = ids[take:]

    def _roll(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = open(self.folder / f"shard_{len(self.counts):05d}.bin", "wb")
        self.counts.append(0)

    def close(self) -> list[int]:
        if self._file is not None:
            self._file.close()
        return self.counts


def _tokenize(folder: Path, tokenizer, documents: Iterator[bytes]) -> tuple[list[int], int]:
    """Writes the shards of `documents` into `folder`; returns the tokens per shard and the documents seen."""
    writer = _ShardWriter(folder, token_dtype(tokenizer.vocab_size), SHARD_TOKENS)
    separator = None if tokenizer.separator is None else np.array([tokenizer.separator])
    group: list[bytes] = []
    n_docs = n_bytes = 0

    def flush() -> None:
        for ids in tokenizer.encode(group):
            writer.write(ids)
            if separator is not None:
                writer.write(separator)
        group.clear()

    try:
        for doc in documents:
            if doc:
                group.append(doc)
                n_docs, n_bytes = n_docs + 1, n_bytes + len(doc)
                if n_bytes >= ENCODE_BYTES:
                    flush()
                    n_bytes = 0
        flush()
    finally:
        counts = writer.close()
    return counts, n_docs


def write_json(path: Path, data: dict) -> None:
    """Writes `data` to `path` atomically (a temporary file, then a rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _load_manifest(folder: Path, key: str) -> dict | None:
    """The manifest of a complete cache in `folder`, or None (absent, foreign or with shards missing)."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        itemsize = np.dtype(manifest["dtype"]).itemsize
        complete = manifest["key"] == key and all(
            (folder / s["file"]).stat().st_size == s["n_tokens"] * itemsize for s in manifest["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest if complete else None


def _build(cache_dir: Path, key: str, tokenizer, plan: list[SourceFile], hf: dict | None,
           max_bytes: int | None) -> dict:
    """Tokenizes into a temporary folder and renames it to cache_dir/key; returns the manifest."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / key
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:16]}-", dir=cache_dir))
    tmp.chmod(0o755)  # mkdtemp makes it private; a cache is shared by every run that reads this corpus
    try:
        began = time.perf_counter()
        counts, n_docs = _tokenize(tmp, tokenizer, _documents(plan, hf, max_bytes))
        manifest = {
            "key": key, "format": FORMAT, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "tokenizer": {"kind": tokenizer.kind, "identity": tokenizer.identity, "path": tokenizer.path,
                          "vocab_size": tokenizer.vocab_size, "separator": tokenizer.separator},
            "dtype": token_dtype(tokenizer.vocab_size).name, "max_bytes": max_bytes,
            "sources": [vars(f) for f in plan], "hf_dataset": hf, "n_documents": n_docs,
            "shards": [{"file": f"shard_{i:05d}.bin", "n_tokens": n} for i, n in enumerate(counts)],
            "n_tokens": sum(counts), "splits": {},
        }
        write_json(tmp / "manifest.json", manifest)
        if final.exists():  # a broken cache (shards deleted by hand): replace it
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same key first: keep its cache
            shutil.rmtree(tmp)
            return json.loads((final / "manifest.json").read_text())
        log.info("tokenized %d documents into %d tokens in %.1f s: %s", n_docs, manifest["n_tokens"],
                 time.perf_counter() - began, final)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def tokenize_corpus(sources: list[str], tokenizer: ByteTokenizer | HFTokenizer, cache_dir: str | Path,
                    max_bytes: int | None = None, hf: dict | None = None) -> tuple[Path, dict]:
    """The cache folder and manifest of `sources` (and the HF dataset `hf`: name, split, text_field) under
    `tokenizer`, tokenized now unless a complete cache with the same key exists.

    Raises:
        ConfigError: a source that matches no file; `datasets` missing or failing for an HF dataset.
    """
    plan = _plan_reads(resolve_sources(sources), max_bytes)
    key = _cache_key(plan, tokenizer.identity, max_bytes, hf)
    folder = Path(cache_dir).expanduser().resolve() / key
    manifest = _load_manifest(folder, key) or _build(folder.parent, key, tokenizer, plan, hf, max_bytes)
    return folder, manifest
