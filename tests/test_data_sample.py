"""`hybrids data sample`: the .npz it writes, what it prints, and one-line errors for bad input."""

import numpy as np
import pytest
import torch

from hybrids.cli import main
from hybrids.training.tasks import IGNORE_INDEX, make_task


def test_writes_the_first_training_batch(tmp_path, capsys):
    out = tmp_path / "sub" / "mqar.npz"
    rc = main(["data", "sample", "task=multiquery_ar", "task.num_kv_pairs=4", "task.vocab_size=128", "n=5",
               "seed=3", f"out={out}", "show=2"])
    assert rc == 0
    data = np.load(out)
    assert sorted(data.files) == ["input_ids", "targets"]
    for key in data.files:
        assert data[key].dtype == np.int64 and data[key].shape == (5, 64)
    expected = make_task("multiquery_ar", num_kv_pairs=4, vocab_size=128, seed=3).batch(0, 5)
    assert np.array_equal(data["input_ids"], expected.input_ids.numpy())
    assert np.array_equal(data["targets"], expected.targets.numpy())
    assert ((data["targets"] != IGNORE_INDEX).sum(axis=1) == 4).all()
    text = capsys.readouterr().out
    assert "task multiquery_ar: vocab_size 128, seq_len 64, split train" in text
    assert "5 examples, 4.0 scored positions per example (min 4, max 4)" in text
    assert text.count("  example ") == 2 and f"wrote {out}: input_ids and targets, int64 (5, 64)" in text
    # a scored position prints as token[target]
    ids, tgt = data["input_ids"][0], data["targets"][0]
    t = int(np.flatnonzero(tgt != IGNORE_INDEX)[0])
    assert f" {ids[t]}[{tgt[t]}] " in text


def test_mad_task_test_split_and_no_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(["data", "sample", "task=selective_copying", "task.seq_len=24", "task.num_tokens_to_copy=4",
               "task.num_test_examples=16", "split=test", "n=3", "show=1"])
    assert rc == 0 and list(tmp_path.iterdir()) == []
    text = capsys.readouterr().out
    assert "split test" in text and "3 examples, 4.0 scored positions" in text
    batch = make_task("selective_copying", seq_len=24, num_tokens_to_copy=4, num_test_examples=16).batch(0, 3, "test")
    first = " ".join(f"{x}[{y}]" if y != IGNORE_INDEX else str(x)
                     for x, y in zip(batch.input_ids[0].tolist(), batch.targets[0].tolist(), strict=True))
    assert first in " ".join(text.split())


def test_existing_file_is_kept_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "x.npz"
    out.write_bytes(b"mine")
    assert main(["data", "sample", "task=mqar", f"out={out}"]) == 2
    assert out.read_bytes() == b"mine"
    assert capsys.readouterr().err == f"hybrids: error: {out} exists; choose another out= or add overwrite=true\n"
    assert main(["data", "sample", "task=mqar", "n=2", f"out={out}", "overwrite=true"]) == 0
    assert np.load(out)["input_ids"].shape == (2, 64)


@pytest.mark.parametrize("argv, message", [
    (["task=mqa"], "unknown task 'mqa'; valid tasks: compression, fuzzy_in_context_recall, in_context_recall, "
                   "long_copy, memorization, mqar, multiquery_ar, noisy_in_context_recall, selective_copy, "
                   "selective_copying"),
    (["task=multiquery_ar", "task.num_pairs=4"], "unknown option(s) num_pairs for task 'multiquery_ar'; valid "
     "options: vocab_size, seq_len, num_kv_pairs, power_a, random_non_queries, num_passes, num_train_examples, "
     "num_test_examples, seed"),
    (["task=multiquery_ar", "task.seq_len=63"], "multiquery_ar: seq_len must be even (key-value pairs and query "
                                                "slots are 2 tokens), got 63"),
    (["task=multiquery_ar", "task.num_kv_pairs=20"], "multiquery_ar: 20 pairs x 1 pass(es) and their queries need "
                                                     "seq_len >= 80, got 64"),
    (["task=multiquery_ar", "task.vocab_size=64"], "multiquery_ar: vocab_size must be > seq_len (Zoology's rule), "
                                                   "got vocab_size 64 and seq_len 64"),
    (["task=noisy_in_context_recall", "task.noise_vocab_size=40"], "noisy_in_context_recall: noise_vocab_size 40 "
                                                                  "must be smaller than vocab_size 32"),
    (["task=in_context_recall", "task.vocab_size=1"],
     "in_context_recall: vocab_size 1 leaves too few key and value tokens after 0 noise and 0 special token(s); "
     "use vocab_size >= 2"),
    (["task=mqar", "n=0"], "n must be a positive int, got 0"),
    (["task=mqar", "split=valid"], "unknown split 'valid'; valid splits: train, val, test"),
    (["task=mqar", "out=x.npy"], "out must name an .npz file, got 'x.npy'"),
    (["task=mqar", "batch=3"], "unknown key 'batch'; valid keys: task, n, seed, split, show, out, overwrite and "
                               "task.<option>"),
    (["task=mqar", "seed=1", "task.seed=2"], "seed=1 and task.seed=2 disagree; give one"),
    (["mqar"], "expected key=value, got 'mqar'"),
    (["n=3"], "name the task: hybrids data sample task=<name>"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["data", "sample", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hybrids: error: {message}") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_sampled_file_round_trips_through_torch(tmp_path):
    out = tmp_path / "m.npz"
    assert main(["data", "sample", "task=memorization", "n=4", "show=0", f"out={out}"]) == 0
    ids = torch.from_numpy(np.load(out)["input_ids"])
    task = make_task("memorization")
    assert (ids[:, 1::2] == task.insert_id).all() and torch.equal(
        torch.from_numpy(np.load(out)["targets"])[:, 1::2], task.value_of[ids[:, 0::2]])
