"""Synthetic recall tasks: determinism, the structure of decoded examples, metrics on oracle and random logits."""

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blocks import ConfigError
from hybrids.training.tasks import (
    IGNORE_INDEX,
    Batch,
    LongCopy,
    SelectiveCopy,
    Task,
    batch_seed,
    make_task,
)

SMALL = {
    "mqar": dict(num_kv_pairs=6, seq_len=48, vocab_size=40),
    "selective_copy": dict(num_tokens=8, seq_len=40, vocab_size=16),
    "long_copy": dict(num_digits=6, distances=[3, 10, 25]),
}


def oracle_logits(batch: Batch, vocab_size: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(batch.targets.clamp_min(0), vocab_size).float()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_shapes_dtypes_and_vocab_range(name):
    task = make_task(name, **SMALL[name])
    batch = task.batch(0, 5)
    for t in (batch.input_ids, batch.targets):
        assert t.shape == (5, task.seq_len) and t.dtype == torch.int64
    assert 0 <= batch.input_ids.min() and batch.input_ids.max() < task.vocab_size
    scored = batch.targets[batch.targets != IGNORE_INDEX]
    assert scored.numel() > 0 and 0 <= scored.min() and scored.max() < task.vocab_size
    assert isinstance(task, Task) and task.name == name


@pytest.mark.parametrize("name", sorted(SMALL))
def test_batches_are_a_pure_function_of_seed_split_index(name):
    task = make_task(name, **SMALL[name])
    a, b = task.batch(3, 16), make_task(name, **SMALL[name]).batch(3, 16)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)
    assert a.extra.keys() == b.extra.keys() and all(torch.equal(a.extra[k], b.extra[k]) for k in a.extra)
    assert not torch.equal(a.input_ids, task.batch(4, 16).input_ids)
    assert not torch.equal(a.input_ids, task.batch(3, 16, "val").input_ids)
    assert not torch.equal(a.input_ids, make_task(name, **SMALL[name], seed=1).batch(3, 16).input_ids)
    # the global RNG plays no part
    torch.manual_seed(123)
    assert torch.equal(a.input_ids, task.batch(3, 16).input_ids)


def test_batch_seed_is_stable_across_processes():
    here = batch_seed("mqar", 0, "train", 7)
    code = "from hybrids.training.tasks import batch_seed; print(batch_seed('mqar', 0, 'train', 7))"
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(there) == here
    assert 0 <= here < 2**63
    seeds = {batch_seed("mqar", 0, s, i) for s in ("train", "val", "test") for i in range(100)}
    assert len(seeds) == 300


def test_mqar_structure():
    task = make_task("mqar", num_kv_pairs=8, num_queries=8, seq_len=64, vocab_size=64)
    n = 8
    batch = task.batch(0, 64)
    for ids, tgt in zip(batch.input_ids.tolist(), batch.targets.tolist(), strict=True):
        keys, values = ids[0 : 2 * n : 2], ids[1 : 2 * n : 2]
        assert len(set(keys)) == n and len(set(values)) == n
        assert all(k in task.key_ids for k in keys) and all(v in task.value_ids for v in values)
        assert all(t == IGNORE_INDEX for t in tgt[: 2 * n])
        lookup = dict(zip(keys, values, strict=True))
        scored = [t for t in range(len(tgt)) if tgt[t] != IGNORE_INDEX]
        assert len(scored) == 8 and all(t % 2 == 0 for t in scored)
        assert sorted(ids[t] for t in scored) == sorted(keys)  # num_queries == n: every key asked once
        for t in scored:
            assert tgt[t] == lookup[ids[t]] == ids[t + 1]
        query_tokens = {t for t in scored} | {t + 1 for t in scored}
        assert all(ids[t] == task.filler_id for t in range(2 * n, len(ids)) if t not in query_tokens)


def test_mqar_more_queries_than_pairs_spreads_them_evenly():
    task = make_task("mqar", num_kv_pairs=4, num_queries=10, seq_len=40, vocab_size=32)
    batch = task.batch(1, 32)
    for ids, tgt in zip(batch.input_ids.tolist(), batch.targets.tolist(), strict=True):
        asked = [ids[t] for t in range(len(tgt)) if tgt[t] != IGNORE_INDEX]
        counts = sorted(asked.count(k) for k in set(ids[0:8:2]))
        assert len(asked) == 10 and counts == [2, 2, 3, 3]


def test_mqar_defaults():
    task = make_task("mqar")
    assert (task.vocab_size, task.seq_len, task.config.num_queries, task.config.num_kv_pairs) == (128, 64, 8, 8)
    assert (task.key_ids, task.value_ids) == (range(1, 64), range(64, 128))
    assert (task.batch(0, 4).targets != IGNORE_INDEX).sum(dim=1).tolist() == [8] * 4


def test_selective_copy_structure():
    task = make_task("selective_copy", num_tokens=16, seq_len=64, vocab_size=32)
    assert isinstance(task, SelectiveCopy)
    assert (task.noise_id, task.separator_id, task.data_ids) == (0, 31, range(1, 31))
    batch = task.batch(2, 64)
    for ids, tgt in zip(batch.input_ids.tolist(), batch.targets.tolist(), strict=True):
        context = ids[:48]
        data = [x for x in context if x != task.noise_id]
        assert len(data) == 16 and all(x in task.data_ids for x in data)
        assert ids[48:] == [task.separator_id] * 16
        assert tgt[:48] == [IGNORE_INDEX] * 48 and tgt[48:] == data
    # positions are spread over the whole context, not packed at its start
    first = (batch.input_ids[:, :48] != 0).float().argmax(dim=1)
    assert first.float().mean() < 8 and (batch.input_ids[:, 16:48] != 0).any()


def test_long_copy_structure_and_distance_definition():
    task = make_task("long_copy", num_digits=8, distances=[0, 16, 32, 64], vocab_size=64)
    assert isinstance(task, LongCopy) and task.seq_len == 64 + 16 + 8
    D = 8
    batch = task.batch(0, 256)
    distances = batch.extra["distance"]
    assert distances.shape == (256,) and distances.dtype == torch.int64
    assert set(distances.tolist()) == {0, 16, 32, 64}
    for ids, tgt, d in zip(batch.input_ids.tolist(), batch.targets.tolist(), distances.tolist(), strict=True):
        m = ids.index(task.marker_id)
        assert ids.count(task.marker_id) == 1
        number = ids[m - d - D : m - d]
        assert all(x in task.digit_ids for x in number)
        assert tgt[m : m + D] == number  # the copy after the marker = the digits exactly d tokens before it
        assert ids[m + 1 : m + D] == number[:-1]  # teacher-forced copy
        assert all(x in task.filler_ids for x in ids[m - d : m])  # distance = filler tokens between them
        assert all(x in task.filler_ids for x in ids[: m - d - D] + ids[m + D :])
        assert [t for t in range(len(tgt)) if tgt[t] != IGNORE_INDEX] == list(range(m, m + D))
    # the marker position is random within its allowed range
    markers = (batch.input_ids == task.marker_id).float().argmax(dim=1)
    assert len(set(markers[distances == 0].tolist())) > 20


def test_long_copy_draws_distances_uniformly():
    task = make_task("long_copy", distances=[16, 32, 64])
    counts = torch.bincount(task.batch(0, 3000).extra["distance"], minlength=65)[[16, 32, 64]].float() / 3000
    assert torch.allclose(counts, torch.full((3,), 1 / 3), atol=0.04)


@settings(max_examples=25, deadline=None)
@given(num_digits=st.integers(1, 12), distances=st.sets(st.integers(0, 40), min_size=1, max_size=4),
       slack=st.integers(0, 10), index=st.integers(0, 10**6))
def test_long_copy_distance_property(num_digits, distances, slack, index):
    seq_len = max(distances) + 2 * num_digits + slack
    task = make_task("long_copy", num_digits=num_digits, distances=sorted(distances), seq_len=seq_len)
    batch = task.batch(index, 8)
    marker = (batch.input_ids == task.marker_id).int().argmax(dim=1)
    for b in range(8):
        m, d = int(marker[b]), int(batch.extra["distance"][b])
        start = m - d - num_digits
        assert start >= 0 and m + num_digits <= seq_len
        assert torch.equal(batch.input_ids[b, start : start + num_digits], batch.targets[b, m : m + num_digits])


@pytest.mark.parametrize("name", sorted(SMALL))
def test_oracle_logits_score_one(name):
    task = make_task(name, **SMALL[name])
    batch = task.batch(0, 64)
    metrics = task.metrics(oracle_logits(batch, task.vocab_size), batch)
    assert all(v.dim() == 0 for v in metrics.values())
    assert all(v.item() == 1.0 for v in metrics.values()), metrics
    if name == "long_copy":
        assert {k for k in metrics if k.startswith("recall@")} == {"recall@3", "recall@10", "recall@25"}


@pytest.mark.parametrize("name, chance", [("mqar", 1 / 40), ("selective_copy", 1 / 16), ("long_copy", 1 / 64)])
def test_random_logits_score_chance(name, chance):
    task = make_task(name, **SMALL[name])
    batch = task.batch(0, 512)
    gen = torch.Generator().manual_seed(0)
    metrics = task.metrics(torch.randn(512, task.seq_len, task.vocab_size, generator=gen), batch)
    assert abs(metrics["accuracy"].item() - chance) < 0.3 * chance
    for key, value in metrics.items():
        if key != "accuracy":
            assert value.item() == 0.0, key


def test_long_copy_metrics_count_one_wrong_digit():
    task = make_task("long_copy", num_digits=4, distances=[5, 9])
    batch = task.batch(0, 20)
    logits = oracle_logits(batch, task.vocab_size)
    b = 3
    t = int((batch.targets[b] != IGNORE_INDEX).nonzero()[1])
    logits[b, t] = logits[b, t].roll(1)  # one wrong digit in example 3
    d = int(batch.extra["distance"][b])
    n_d = int((batch.extra["distance"] == d).sum())
    metrics = task.metrics(logits, batch)
    assert metrics["accuracy"].item() == pytest.approx(1 - 1 / 80)
    assert metrics["sequence_accuracy"].item() == pytest.approx(19 / 20)
    assert metrics[f"recall@{d}"].item() == pytest.approx((n_d - 1) / n_d)
    other = 14 - d  # the other distance of [5, 9]
    assert metrics[f"recall@{other}"].item() == 1.0


def test_long_copy_omits_absent_distances():
    task = make_task("long_copy", distances=[16, 32, 64])
    batch = task.batch(0, 6)
    batch.extra["distance"] = torch.full((6,), 32)
    metrics = task.metrics(oracle_logits(batch, task.vocab_size), batch)
    assert sorted(metrics) == ["accuracy", "recall@32", "sequence_accuracy"]


def test_selective_copy_sequence_accuracy():
    task = make_task("selective_copy", **SMALL["selective_copy"])
    batch = task.batch(0, 10)
    logits = oracle_logits(batch, task.vocab_size)
    logits[[0, 0, 7], [-1, -2, -1]] = 0.0  # argmax falls to token 0 (noise): never a target
    metrics = task.metrics(logits, batch)
    assert metrics["accuracy"].item() == pytest.approx(1 - 3 / 80)
    assert metrics["sequence_accuracy"].item() == pytest.approx(8 / 10)


def test_batch_to_moves_every_tensor():
    batch = make_task("long_copy").batch(0, 2).to("meta")
    assert {t.device.type for t in (batch.input_ids, batch.targets, *batch.extra.values())} == {"meta"}


@pytest.mark.parametrize("name, options, message", [
    ("mqar", dict(num_kv_pairs=20, seq_len=64), "take 80 tokens, more than seq_len 64"),
    ("mqar", dict(num_kv_pairs=8, num_queries=30), "more than seq_len"),
    ("mqar", dict(num_kv_pairs=10, vocab_size=16, seq_len=64), "use vocab_size >= 21"),
    ("mqar", dict(num_queries=0), "must be >= 1"),
    ("mqar", dict(seq_len="64"), "seq_len must be an int, got '64'"),
    ("selective_copy", dict(num_tokens=40), "seq_len >= 80"),
    ("selective_copy", dict(vocab_size=2), "use vocab_size >= 3"),
    ("long_copy", dict(distances=[16, 100], seq_len=64), "needs seq_len >= 116"),
    ("long_copy", dict(distances=[16, 16]), "distinct"),
    ("long_copy", dict(distances=[-1]), ">= 0"),
    ("long_copy", dict(distances=[]), "non-empty"),
    ("long_copy", dict(distances=16), "must be a list of ints"),
    ("long_copy", dict(vocab_size=11), "use vocab_size >= 12"),
])
def test_impossible_configs_say_why(name, options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        make_task(name, **options)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown task 'mqa'; valid tasks: compression, fuzzy_in_context_recall, "
                                          "in_context_recall, long_copy, memorization, mqar, multiquery_ar, "
                                          "noisy_in_context_recall, selective_copy, selective_copying$"):
        make_task("mqa")
    with pytest.raises(ConfigError, match="unknown option.* num_pairs for task 'mqar'; valid options: "
                                          "num_kv_pairs, vocab_size, seq_len, num_queries, seed"):
        make_task("mqar", num_pairs=4)
    with pytest.raises(ConfigError, match="unknown split 'valid'; valid splits: train, val, test"):
        make_task("mqar").batch(0, 4, "valid")
    with pytest.raises(ConfigError, match="batch_size"):
        make_task("mqar").batch(0, 0)


def test_long_copy_default_seq_len_and_list_options():
    task = make_task("long_copy", distances=[8, 4])
    assert task.config.distances == (8, 4) and task.seq_len == 8 + 16 + 8 and task.vocab_size == 64
    assert make_task("long_copy").seq_len == 88
