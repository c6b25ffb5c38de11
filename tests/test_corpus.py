"""Corpora: weighted mixtures of text folders and token files, their order, errors, and exact resume."""

import json

import numpy as np
import pytest
import torch

from blocks import ConfigError
from hybrids.training.corpus import apportion, slot_pattern
from hybrids.training.data import make_task
from tests.test_train import metric_rows

SEQ = 16


@pytest.fixture
def sources(tmp_path):
    """A text folder (bytes 'a'..'z' lines) and a .npy of byte tokens with separators, both a few KB."""
    (tmp_path / "text").mkdir()
    for i in range(3):
        (tmp_path / "text" / f"{i}.txt").write_text("".join(chr(97 + (i + j) % 26) * 7 + "\n" for j in range(120)))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, 3000).astype(np.int64)
    ids[::500] = 256  # document separators
    np.save(tmp_path / "ids.npy", ids)
    ids.astype(np.uint16).tofile(tmp_path / "ids.bin")
    return tmp_path


def lm(tmp_path, entries, **kw):
    return make_task({"name": "lm", "sources": entries, "seq_len": SEQ, "cache_dir": str(tmp_path / "cache"), **kw})


def test_apportion_and_pattern_spread_each_source_at_its_share():
    assert apportion([3, 1]) == [750, 250]
    assert apportion([1, 1, 1]) == [334, 333, 333]
    source, rank = slot_pattern([750, 250])
    assert np.bincount(source).tolist() == [750, 250]
    assert source[:8].tolist() == [0, 0, 1, 0, 0, 0, 1, 0]  # one of four slots, evenly spread
    assert rank[source == 1].tolist() == list(range(250))
    with pytest.raises(ConfigError, match=r"weight 0.0001 is below 1/1000"):
        apportion([1, 0.0001])


def test_a_mixture_draws_each_source_at_its_weight_and_walks_each_sources_epochs(sources):
    task = lm(sources, [{"path": str(sources / "text"), "weight": 3}, {"tokens": str(sources / "ids.npy")}])
    batch = task.batch(0, 400)
    assert np.bincount(batch.extra["source"].numpy()).tolist() == [300, 100]
    text, tokens = task.parts
    # every window is the source's own window, in the source's own keyed order
    rows = batch.extra["source"] == 1
    expected = torch.stack([tokens.batch(w, 1).input_ids[0] for w in range(100)])
    assert torch.equal(batch.input_ids[rows], expected)
    letters = {10, 256, *range(97, 123)}  # the text files' bytes and the document separator
    assert set(batch.input_ids[~rows].unique().tolist()) <= letters and text.n_train > 0
    # the .npy's ids come back exactly: the stream of its cache equals the file
    assert np.array_equal(tokens.read(0, 3000), np.load(sources / "ids.npy"))
    assert torch.equal(task.batch(7, 5).input_ids, task.batch(7, 5).input_ids)
    # document ids come through the mixture: a new document starts after each separator (256)
    ids, docs = batch.input_ids, batch.doc_ids
    assert docs is not None and docs.shape == ids.shape
    assert torch.equal(docs[:, 1:] != docs[:, :-1], ids[:, :-1] == 256)
    record = task.record()
    assert [s["share"] for s in record["sources"]] == [0.75, 0.25] and record["sources"][1]["n_tokens"] == 3000
    assert task.describe() == "text:0.75,ids.npy:0.25"


def test_bin_and_npy_token_files_are_the_same_source(sources):
    a = lm(sources, [{"tokens": str(sources / "ids.npy")}])
    b = lm(sources, [{"tokens": str(sources / "ids.bin"), "dtype": "uint16"}])
    assert torch.equal(a.batch(3, 8).input_ids, b.batch(3, 8).input_ids)
    assert torch.equal(a.batch(0, 4, "val").targets, b.batch(0, 4, "val").targets)
    assert b.parts[0].manifest["shards"][0]["file"] == str((sources / "ids.bin").resolve())  # read in place


@pytest.mark.parametrize("entries, message", [
    ([{"path": "nope/dir", "weight": 1}], "no files matched source 'nope/dir'"),
    ([{"tokens": "nope.npy"}], "no such token file: nope.npy"),
    ([{"path": "TEXT", "weight": 0}, {"tokens": "IDS", "weight": 0}], "weights must sum to a positive number, got 0"),
    ([{"path": "TEXT", "weight": -1}], r"sources\[0\].weight must be a number >= 0, got -1"),
    ([{"path": "TEXT", "tokens": "IDS"}], "needs exactly one of path, tokens, hf"),
    ([{"path": "TEXT", "wieght": 2}], r"unknown key\(s\) wieght in task.sources\[0\]"),
    ([{"path": "EMPTY"}], r"sources\[0\] \(.*empty\) is empty: its files hold no text"),
    ([{"tokens": "EMPTYBIN"}], "is empty: the corpus needs tokens"),
    ([{"tokens": "BIG"}], r"holds id 300, outside the tokenizer's vocabulary \[0, 257\)"),
])
def test_bad_corpora_fail_with_one_line(sources, entries, message):
    (sources / "empty").mkdir()
    (sources / "empty" / "a.txt").write_text("")
    (sources / "e.bin").write_bytes(b"")
    np.save(sources / "big.npy", np.array([1, 2, 300]))
    names = {"TEXT": str(sources / "text"), "IDS": str(sources / "ids.npy"), "EMPTY": str(sources / "empty"),
             "EMPTYBIN": str(sources / "e.bin"), "BIG": str(sources / "big.npy")}
    entries = [{k: names.get(v, v) for k, v in e.items()} for e in entries]
    with pytest.raises(ConfigError, match=message):
        lm(sources, entries)


def mixture_overrides(tmp_path, sources, *extra):
    entries = f"[{{path:{sources / 'text'},weight:2}},{{tokens:{sources / 'ids.npy'},weight:1}}]"
    return [f"run.dir={tmp_path}/train", "tracking.enabled=false", "model=mamba2-tiny", "model.d_model=32",
            "model.vocab_size=257", "task=lm", f"task.sources={entries}", f"task.seq_len={SEQ}",
            f"+task.cache_dir={tmp_path}/cache", "trainer.batch_size=4", "trainer.max_steps=8", "trainer.ckpt_every=3",
            "trainer.val_every=100", "trainer.val_batches=1", "trainer.progress_bar=false", "trainer.log_every=1",
            "schedule.warmup_steps=2", *extra]


def test_a_two_source_run_killed_and_resumed_equals_the_uninterrupted_run(tmp_path, sources, one_thread):
    import lightning as L

    from hybrids.save import from_run
    from hybrids.training.config import compose
    from hybrids.training.run import train

    class Crash(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 5:
                raise RuntimeError("simulated crash")

    whole = train(compose(mixture_overrides(tmp_path / "a", sources)))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(compose(mixture_overrides(tmp_path / "b", sources)), callbacks=[Crash()])
    resumed = train(compose(mixture_overrides(tmp_path / "b", sources)))
    assert resumed.resumed_from.endswith("last.ckpt") and resumed.steps == whole.steps == 8
    losses = [metric_rows(r.run_dir, "train/loss") for r in (whole, resumed)]
    assert set(losses[1]) >= {3, 4, 5, 6, 7} and all(losses[1][s] == losses[0][s] for s in range(3, 8))
    assert resumed.metrics["val/loss"] == whole.metrics["val/loss"]
    a, b = from_run(whole.run_dir), from_run(resumed.run_dir)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    record = json.loads((whole.run_dir / "data.json").read_text())
    assert [s["weight"] for s in record["sources"]] == [2, 1] and record["period"] == 1000


def test_a_tokenizer_larger_than_the_model_is_one_line(tmp_path, sources, capsys):
    from hybrids.cli import main

    overrides = [o for o in mixture_overrides(tmp_path, sources) if not o.startswith("model.vocab_size")]
    assert main(["train", *overrides, "model.vocab_size=128"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "hybrids: error: model.vocab_size = 128 is smaller than the task's vocabulary (257); "
        "set model.vocab_size=257"]
