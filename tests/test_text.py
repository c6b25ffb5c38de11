"""Language-modelling data: source globs, the shard cache and its manifest, tokenizers, split, order, metrics."""

import hashlib
import json
import math
import os
import pickle
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from blocks import ConfigError
from hybrids.training import tokenizer
from hybrids.training.tasks import Batch
from hybrids.training.text import TextTask, make_text_task, permute, stdlib_source
from hybrids.training.tokenizer import resolve_sources

SEQ = 32
FILES = {
    "a.txt": "The quick brown fox jumps over the lazy dog.\n" * 40,
    "docs/b.md": "# Über naïve façades\nCafé, crème brûlée, 日本語のテキスト, emoji \U0001f600 and ∑ x².\n" * 30,
    "docs/deep/c.py": "def f(x):\n    return x * 2  # doubled\n" * 50,
    "docs/.hidden.txt": "never read\n",
    "docs/__pycache__/c.cpython-311.pyc": "never read either\n",
}


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "corpus"
    for name, content in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content, encoding="utf-8")
    return root


def read_files(root: Path) -> list[bytes]:
    """The documents a folder source reads, in the cache's order (sorted absolute path strings)."""
    names = sorted(str((root / n).resolve()) for n in FILES if "/." not in "/" + n and "__pycache__" not in n)
    return [Path(n).read_bytes() for n in names]


def byte_stream(docs: list[bytes]) -> np.ndarray:
    return np.concatenate([np.append(np.frombuffer(d, np.uint8).astype(np.int64), 256) for d in docs])


def task(corpus, tmp_path, **kw) -> TextTask:
    return make_text_task(str(corpus), **{"seq_len": SEQ, "cache_dir": str(tmp_path / "cache"), **kw})


def train_offsets(t: TextTask) -> np.ndarray:
    return t.offsets(0, t.n_train, "train")[0]


def val_offsets(t: TextTask) -> np.ndarray:
    offsets, scored = t.offsets(0, t.n_val, "val")
    assert scored.all()
    return offsets


def test_sources_folder_glob_and_skips(corpus):
    everything = resolve_sources([str(corpus)])
    assert [p.relative_to(corpus).as_posix() for p in everything] == ["a.txt", "docs/b.md", "docs/deep/c.py"]
    assert resolve_sources([f"{corpus}/**/*.py"]) == [corpus / "docs/deep/c.py"]
    assert resolve_sources([f"{corpus}/*.txt", f"{corpus}/docs/*.md"]) == [corpus / "a.txt", corpus / "docs/b.md"]
    assert resolve_sources([f"{corpus}/doc?/**"]) == everything[1:]
    assert resolve_sources([str(corpus / "a.txt"), str(corpus)]) == everything  # deduplicated
    (corpus / "docs/site-packages/pkg").mkdir(parents=True)
    (corpus / "docs/site-packages/pkg/m.py").write_text("installed\n")
    assert resolve_sources([f"{corpus}/**/*.py"]) == [corpus / "docs/deep/c.py"]
    assert resolve_sources([f"{corpus}/docs/site-packages"]) == [corpus / "docs/site-packages/pkg/m.py"]


def test_byte_round_trip(corpus, tmp_path):
    t = task(corpus, tmp_path)
    stream = byte_stream(read_files(corpus))
    assert t.vocab_size == 257 and t.name == "lm" and t.manifest["n_tokens"] == len(stream)
    assert t.manifest["n_documents"] == 3
    b = t.batch(3, 8)
    assert b.input_ids.shape == b.targets.shape == (8, SEQ)
    assert b.input_ids.dtype == b.targets.dtype == torch.int64
    assert torch.equal(b.targets[:, :-1], b.input_ids[:, 1:])
    for row, offset in enumerate(b.extra["offset"].tolist()):
        window = stream[offset:offset + SEQ + 1]
        assert b.input_ids[row].tolist() == window[:-1].tolist() and b.targets[row, -1] == window[-1]
    # the windows, in block order, decode back to the files' bytes
    whole = np.concatenate([t.read(o, SEQ + 1) for o in range(0, t.n_blocks * (SEQ + 1), SEQ + 1)])
    decoded = t.tokenizer.decode(whole, separator=b"<SEP>")
    assert len(decoded) > sum(map(len, read_files(corpus))) - (SEQ + 1)
    assert decoded == (b"<SEP>".join(read_files(corpus)) + b"<SEP>")[: len(decoded)]
    assert "日本語のテキスト, emoji \U0001f600".encode() in decoded


def test_manifest_and_reuse(corpus, tmp_path, monkeypatch):
    t = task(corpus, tmp_path)
    folder = tmp_path / "cache" / t.manifest["key"]
    assert t.folder == folder
    manifest = json.loads((folder / "manifest.json").read_text())
    docs = read_files(corpus)
    assert manifest["tokenizer"] == {"kind": "byte", "identity": "byte", "path": None, "vocab_size": 257,
                                     "separator": 256}
    assert manifest["dtype"] == "uint16" and manifest["max_bytes"] is None and manifest["hf_dataset"] is None
    assert [s["size"] for s in manifest["sources"]] == [len(d) for d in docs]
    assert all(Path(s["path"]).is_absolute() and s["mtime_ns"] > 0 for s in manifest["sources"])
    assert manifest["shards"] == [{"file": "shard_00000.bin", "n_tokens": sum(map(len, docs)) + 3}]
    assert manifest["n_tokens"] == manifest["shards"][0]["n_tokens"] and "created_at" in manifest
    shard = folder / "shard_00000.bin"
    assert shard.stat().st_size == 2 * manifest["n_tokens"]
    split = manifest["splits"][f"seq_len={SEQ},val_fraction=0.05"]
    assert split["n_val"] == t.n_val == t.n_blocks // 20 and split["n_train"] == t.n_train
    assert split["val_token_ranges"][0] == [19 * (SEQ + 1), 20 * (SEQ + 1)]
    assert sorted(os.listdir(tmp_path / "cache")) == [manifest["key"]]  # no temporary folder left

    mtime = shard.stat().st_mtime_ns
    monkeypatch.setattr(tokenizer.ByteTokenizer, "encode", lambda *a: pytest.fail("tokenized again"))
    again = task(corpus, tmp_path)
    assert again.manifest["key"] == manifest["key"] and shard.stat().st_mtime_ns == mtime
    assert torch.equal(again.batch(5, 4).input_ids, t.batch(5, 4).input_ids)
    other = task(corpus, tmp_path, seq_len=16, val_fraction=0.25)  # a new split reuses the shards too
    assert set(other.manifest["splits"]) == {f"seq_len={SEQ},val_fraction=0.05", "seq_len=16,val_fraction=0.25"}
    assert shard.stat().st_mtime_ns == mtime


def test_key_changes_with_inputs(corpus, tmp_path):
    key = task(corpus, tmp_path).manifest["key"]
    assert task(corpus, tmp_path, max_bytes=1000).manifest["key"] != key
    capped = task(corpus, tmp_path, max_bytes=1000)
    assert capped.manifest["n_tokens"] == 1000 + 1 and [s["bytes_read"] for s in capped.manifest["sources"]] == [1000]
    with open(corpus / "docs/b.md", "a", encoding="utf-8") as f:
        f.write("one more line\n")
    edited = task(corpus, tmp_path)
    assert edited.manifest["key"] != key
    assert edited.manifest["n_tokens"] == byte_stream(read_files(corpus)).size
    assert len(os.listdir(tmp_path / "cache")) == 3


def train_hf_tokenizer(corpus: Path, path: Path, model: str = "bpe") -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if model == "bpe":
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "<|endoftext|>"])
    else:
        tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]"])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([d.decode() for d in read_files(corpus)], trainer)
    tok.save(str(path))
    return path


def test_hf_tokenizer_file(corpus, tmp_path):
    path = train_hf_tokenizer(corpus, tmp_path / "tokenizer.json")
    t = task(corpus, tmp_path, tokenizer=str(path), seq_len=8)
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(path))
    m = t.manifest
    assert t.vocab_size == hf.get_vocab_size() and m["dtype"] == "uint16"
    assert m["tokenizer"]["identity"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert m["tokenizer"]["separator"] == hf.token_to_id("<|endoftext|>")
    expected = []
    for doc in read_files(corpus):
        expected += hf.encode(doc.decode(), add_special_tokens=False).ids + [hf.token_to_id("<|endoftext|>")]
    assert m["n_tokens"] == len(expected)
    b = t.batch(0, 4)
    for row, offset in enumerate(b.extra["offset"].tolist()):
        assert b.input_ids[row].tolist() == expected[offset:offset + 8]
    assert "bits_per_byte" not in t.metrics(torch.zeros(4, 8, t.vocab_size), b)
    assert "brûlée" in t.decode(expected[: len(expected)])

    words = train_hf_tokenizer(corpus, tmp_path / "words.json", model="wordlevel")
    w = task(corpus, tmp_path, tokenizer=str(words), seq_len=8)
    assert w.manifest["key"] != m["key"] and w.manifest["tokenizer"]["separator"] is None


def test_order_is_seeded_and_resumable(corpus, tmp_path):
    t = task(corpus, tmp_path)
    fresh = task(corpus, tmp_path)
    for index in [0, 1, 7, t.n_train // 4, t.n_train, 3 * t.n_train + 1]:  # epochs 0 to 3, across their edges
        a, b = t.batch(index, 4), fresh.batch(index, 4)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)
    revived = pickle.loads(pickle.dumps(t))
    assert torch.equal(revived.batch(9, 4).input_ids, t.batch(9, 4).input_ids)
    # batch k of size B is windows kB ... kB + B - 1 of one sequence, whatever B is
    assert torch.equal(torch.cat([t.batch(2 * 3, 2).input_ids, t.batch(2 * 3 + 1, 2).input_ids]),
                       t.batch(3, 4).input_ids)
    epoch0, epoch1 = train_offsets(t), t.offsets(1, t.n_train, "train")[0]
    assert sorted(epoch0) == sorted(epoch1) and not np.array_equal(epoch0, epoch1)
    assert len(set(epoch0.tolist())) == t.n_train  # an epoch visits each train block once
    reseeded = task(corpus, tmp_path, seed=1)
    assert not np.array_equal(train_offsets(reseeded), epoch0)
    assert sorted(train_offsets(reseeded)) == sorted(epoch0)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000, 65537])
def test_permute_is_a_permutation(n):
    p = permute(np.arange(n), n, seed=3, epoch=2)
    assert np.array_equal(np.sort(p), np.arange(n))
    if n > 16:
        assert not np.array_equal(p, np.arange(n)) and not np.array_equal(p, permute(np.arange(n), n, 3, 3))


@pytest.mark.parametrize("val_fraction", [0.05, 0.1, 0.3, 0.5, 0.9])
def test_train_and_val_are_disjoint(corpus, tmp_path, val_fraction):
    t = task(corpus, tmp_path, seq_len=16, val_fraction=val_fraction)
    train, val = np.sort(train_offsets(t)), np.sort(val_offsets(t))
    assert t.n_val == math.floor(t.n_blocks * val_fraction) > 0 and t.n_train + t.n_val == t.n_blocks
    assert len(np.unique(val)) == t.n_val
    windows = np.sort(np.concatenate([train, val]))  # every window is a whole block; none overlap another
    assert np.array_equal(windows, np.arange(t.n_blocks) * 17)
    gaps = np.diff(np.sort(val)) // 17
    assert gaps.max() - gaps.min() <= 1  # val blocks are spread evenly
    ranges = t.manifest["splits"][f"seq_len=16,val_fraction={val_fraction}"]["val_token_ranges"]
    assert sum(e - s for s, e in ranges) == 17 * t.n_val
    assert all(any(s <= o < e for s, e in ranges) for o in val) and not any(s <= o < e for s, e in ranges
                                                                           for o in train)


def test_val_batches_fixed_and_complete(corpus, tmp_path):
    t = task(corpus, tmp_path)
    n = t.val_batches(5)
    assert n == math.ceil(t.n_val / 5)
    batches = [t.batch(i, 5, "val") for i in range(n)]
    offsets = torch.cat([b.extra["offset"] for b in batches])
    scored = torch.cat([(b.targets != -100).all(1) for b in batches])
    assert scored.sum() == t.n_val and (~scored).sum() == n * 5 - t.n_val  # the tail repeats, unscored
    assert (batches[-1].targets[~scored[-5:]] == -100).all()
    assert np.array_equal(offsets[scored].numpy(), val_offsets(t))
    assert torch.equal(t.batch(n, 5, "val").input_ids, batches[0].input_ids)  # later indices wrap around
    assert torch.equal(task(corpus, tmp_path, seed=7).batch(1, 5, "val").input_ids, batches[1].input_ids)


def test_windows_across_shards(corpus, tmp_path, monkeypatch):
    whole = task(corpus, tmp_path)
    monkeypatch.setattr(tokenizer, "SHARD_TOKENS", 1000)
    sharded = task(corpus, tmp_path / "sharded")
    counts = [s["n_tokens"] for s in sharded.manifest["shards"]]
    assert len(counts) > 3 and counts[:-1] == [1000] * (len(counts) - 1) and sum(counts) == whole.manifest["n_tokens"]
    for index in range(0, 40, 3):
        assert torch.equal(whole.batch(index, 8).input_ids, sharded.batch(index, 8).input_ids)
    assert np.array_equal(sharded.read(990, 2030), whole.read(990, 2030))


def test_metrics(corpus, tmp_path):
    t = task(corpus, tmp_path)
    b = t.batch(0, 4, "val")
    perfect = torch.nn.functional.one_hot(b.targets, 257).float() * 100
    m = t.metrics(perfect, b)
    assert m["accuracy"] == 1 and m["bits_per_byte"] < 1e-3
    uniform = t.metrics(torch.zeros(4, SEQ, 257), b)
    n_bytes = (b.targets < 256).sum().item()
    assert torch.isclose(uniform["bits_per_byte"], torch.tensor(math.log2(257) * b.targets.numel() / n_bytes))
    half = b.targets.clone()
    half[:, : SEQ // 2] = -100
    m = t.metrics(perfect, Batch(b.input_ids, half, {}))
    assert m["accuracy"] == 1 and set(m) == {"accuracy", "bits_per_byte"}


def test_errors(corpus, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="no files matched source"):
        task(tmp_path / "missing", tmp_path)
    with pytest.raises(ConfigError, match=r"no files matched source .*\*\*/\*\.rs"):
        make_text_task([str(corpus), f"{corpus}/**/*.rs"], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="cannot read tokenizer file .*nope.json"):
        task(corpus, tmp_path, tokenizer=str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read tokenizer file .*not a tokenizer.json"):
        task(corpus, tmp_path, tokenizer=str(tmp_path / "bad.json"))
    with pytest.raises(ConfigError, match="seq_len 100000 is larger than the data"):
        task(corpus, tmp_path, seq_len=100_000)
    with pytest.raises(ConfigError, match="val split empty"):
        task(corpus, tmp_path, seq_len=1000, val_fraction=0.01)
    with pytest.raises(ConfigError, match="val_fraction must lie in"):
        task(corpus, tmp_path, val_fraction=0.0)
    with pytest.raises(ConfigError, match="unknown split 'test'"):
        task(corpus, tmp_path).batch(0, 2, "test")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ConfigError, match="pip install datasets"):
        make_text_task([], hf_dataset="someone/corpus", cache_dir=str(tmp_path / "cache"))
    assert not [p for p in os.listdir(tmp_path / "cache") if p.startswith(".")]  # failed builds leave nothing


def test_interrupted_build_leaves_no_cache(corpus, tmp_path, monkeypatch):
    def interrupted(self, ids):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(tokenizer._ShardWriter, "write", interrupted)
        with pytest.raises(KeyboardInterrupt):
            task(corpus, tmp_path)
    assert os.listdir(tmp_path / "cache") == []
    assert task(corpus, tmp_path).manifest["n_tokens"] == byte_stream(read_files(corpus)).size


def test_hf_dataset_through_datasets(corpus, tmp_path, monkeypatch):
    records = [{"text": "première ligne", "id": 0}, {"text": "second record", "id": 1}, {"text": "x" * 200, "id": 2}]
    calls = []

    def load_dataset(name, split, streaming):
        calls.append((name, split))
        return iter(records)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    t = make_text_task([], hf_dataset="someone/corpus", seq_len=8, val_fraction=0.2, cache_dir=str(tmp_path / "c"))
    stream = byte_stream([r["text"].encode() for r in records])
    assert calls == [("someone/corpus", "train")] and t.manifest["n_tokens"] == stream.size
    assert t.manifest["hf_dataset"] == {"name": "someone/corpus", "split": "train", "text_field": "text"}
    make_text_task([], hf_dataset="someone/corpus", seq_len=8, val_fraction=0.2, cache_dir=str(tmp_path / "c"))
    assert len(calls) == 1  # cached: the dataset is not loaded again
    mixed = make_text_task(str(corpus / "a.txt"), hf_dataset="someone/corpus", max_bytes=2000, seq_len=8,
                           cache_dir=str(tmp_path / "c"))
    n_file = len(FILES["a.txt"])
    assert mixed.manifest["n_tokens"] == 2000 + 4  # the file, then records until 2000 bytes; 4 separators
    first = "première ligne".encode()
    tail = [*first, 256, *b"second record", 256, *b"x" * (2000 - n_file - len(first) - 13), 256]
    assert mixed.read(n_file + 1, 2004 - n_file - 1).tolist() == tail
    with pytest.raises(ConfigError, match="has no field 'body'; fields: text, id"):
        make_text_task([], hf_dataset="someone/corpus", hf_text_field="body", cache_dir=str(tmp_path / "c"))


def test_stdlib_corpus(tmp_path):
    files = resolve_sources([stdlib_source()])
    assert sum(f.stat().st_size for f in files) > 1_000_000
    assert not any("site-packages" in f.parts for f in files)
    began = time.perf_counter()
    t = make_text_task(stdlib_source(), max_bytes=2_000_000, cache_dir=str(tmp_path / "cache"))
    assert time.perf_counter() - began < 10
    assert t.manifest["n_tokens"] == 2_000_000 + t.manifest["n_documents"]
    assert t.manifest["sources"][0]["path"] == str(files[0])
    b = t.batch(0, 4)
    assert b.input_ids.shape == (4, 256) and b"def " in t.decode(t.read(0, 20_000))
