"""Zoology's multiquery_ar against its published definition: vocabulary split, layout, power-law query gaps,
random non-queries, scored positions, the original's rules, determinism and fixed sets."""

import pytest
import torch

from blocks import ConfigError
from hybrids.training.tasks import IGNORE_INDEX, MultiqueryAR, make_task


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_defaults_are_zoologys():
    task = make_task("multiquery_ar")
    c = task.config
    assert isinstance(task, MultiqueryAR)
    assert (c.vocab_size, c.seq_len, c.num_kv_pairs, c.power_a, c.random_non_queries, c.num_passes) == \
        (8192, 64, 8, 0.01, True, 1)
    assert (task.key_ids, task.value_ids) == (range(1, 4096), range(4096, 8192))
    assert (task.seq_len, task.vocab_size, task.context_len, task.space) == (64, 8192, 16, 24)


def test_layout_keys_values_and_scored_positions():
    n, L, V = 6, 64, 100
    task = make_task("multiquery_ar", num_kv_pairs=n, seq_len=L, vocab_size=V, random_non_queries=False)
    batch = task.batch(0, 200)
    assert batch.input_ids.shape == batch.targets.shape == (200, L) and batch.input_ids.dtype == torch.int64
    for ids, tgt in zip(batch.input_ids.tolist(), batch.targets.tolist(), strict=True):
        keys, values = ids[0 : 2 * n : 2], ids[1 : 2 * n : 2]
        assert len(set(keys)) == n and all(1 <= k < V // 2 for k in keys)
        assert len(set(values)) == n and all(V // 2 <= v < V for v in values)
        value_of = dict(zip(keys, values, strict=True))
        scored = [t for t in range(L) if tgt[t] != IGNORE_INDEX]
        # every key queried exactly once, at an even offset of the query region, scored with its value
        assert sorted(ids[t] for t in scored) == sorted(keys)
        assert all(t >= 2 * n and (t - 2 * n) % 2 == 0 and tgt[t] == value_of[ids[t]] for t in scored)
        # the value does not follow the query, and the rest of the query region is filler 0
        assert all(ids[t] == 0 for t in range(2 * n, L) if t not in scored)
        assert tgt[: 2 * n] == [IGNORE_INDEX] * (2 * n)


def test_ith_key_takes_ith_drawn_gap_with_power_law_probabilities():
    """The first key's gap slot follows p(g) ~ (g + 1) ** (power_a - 1) exactly (it is the first weighted draw)."""
    task = make_task("multiquery_ar", num_kv_pairs=4, seq_len=64, vocab_size=128, random_non_queries=False)
    batch = task.batch(0, 4000)
    first_key = batch.input_ids[:, 0:1]
    pos = (batch.input_ids[:, 8:] == first_key).int().argmax(dim=1)  # offset in the query region
    assert (pos % 2 == 0).all()
    counts = torch.bincount(pos // 2, minlength=task.space).double()
    p = task.gap_probabilities()
    assert p.shape == (28,) and torch.isclose(p[0] / p[9], torch.tensor(10.0, dtype=torch.float64) ** 0.99)
    assert chi_square(counts, p) < 55.5  # 27 degrees of freedom: the 99.9% quantile
    assert abs(counts[0].item() / 4000 - p[0].item()) < 0.03 and p[0] > 0.25  # mass near the context


def test_power_a_one_gives_uniform_gaps_and_all_gaps_distinct():
    task = make_task("multiquery_ar", num_kv_pairs=1, seq_len=34, vocab_size=64, power_a=1,
                     random_non_queries=False)
    assert task.config.power_a == 1.0
    batch = task.batch(1, 3200)
    slots = ((batch.targets != IGNORE_INDEX).int().argmax(dim=1) - 2) // 2
    counts = torch.bincount(slots, minlength=16).double()
    assert chi_square(counts, torch.full((16,), 1 / 16, dtype=torch.float64)) < 37.7  # 15 dof, 99.9%
    many = make_task("multiquery_ar", num_kv_pairs=8, seq_len=32, vocab_size=64).batch(0, 100)
    assert ((many.targets != IGNORE_INDEX).sum(dim=1) == 8).all()  # 8 queries in exactly 8 slots


def test_random_non_queries_are_uniform_over_the_vocabulary():
    V = 64
    task = make_task("multiquery_ar", num_kv_pairs=4, seq_len=62, vocab_size=V)
    batch = task.batch(0, 2000)
    region, tgt = batch.input_ids[:, 8:], batch.targets[:, 8:]
    filler = region[tgt == IGNORE_INDEX]
    counts = torch.bincount(filler, minlength=V).double()
    assert chi_square(counts, torch.full((V,), 1 / V, dtype=torch.float64)) < 103.4  # 63 dof, 99.9%
    assert counts[0] > 0  # 0 is drawn as well, as in the original


def test_num_passes_repeats_the_context():
    task = make_task("multiquery_ar", num_kv_pairs=3, num_passes=2, seq_len=24, vocab_size=64)
    ids = task.batch(0, 50).input_ids
    assert torch.equal(ids[:, :6], ids[:, 6:12]) and task.context_len == 12 and task.space == 6
    assert ((task.batch(0, 50).targets[:, :12]) == IGNORE_INDEX).all()


def test_deterministic_per_seed_split_and_index():
    task = make_task("multiquery_ar", seq_len=32, vocab_size=64, num_kv_pairs=4)
    a = task.batch(2, 16)
    assert torch.equal(a.input_ids, make_task("multiquery_ar", seq_len=32, vocab_size=64, num_kv_pairs=4)
                       .batch(2, 16).input_ids)
    assert not torch.equal(a.input_ids, task.batch(3, 16).input_ids)
    assert not torch.equal(a.input_ids, task.batch(2, 16, "val").input_ids)
    other = make_task("multiquery_ar", seq_len=32, vocab_size=64, num_kv_pairs=4, seed=1)
    assert not torch.equal(a.input_ids, other.batch(2, 16).input_ids)


def test_fixed_train_set_repeats_over_epochs():
    task = make_task("multiquery_ar", seq_len=32, vocab_size=64, num_kv_pairs=4, num_train_examples=40,
                     num_test_examples=24)
    epoch0 = torch.cat([task.batch(i, 8).input_ids for i in range(5)])
    epoch1 = torch.cat([task.batch(i, 8).input_ids for i in range(5, 10)])
    assert len({tuple(r) for r in epoch0.tolist()}) == 40
    assert {tuple(r) for r in epoch0.tolist()} == {tuple(r) for r in epoch1.tolist()}
    assert not torch.equal(epoch0, epoch1)  # each epoch has its own order
    val = task.batch(0, 16, "val").input_ids
    assert torch.equal(task.batch(1, 16, "test").input_ids[8:], val[:8])  # 24 test examples wrap around


def test_oracle_scores_one():
    task = make_task("multiquery_ar", seq_len=32, vocab_size=64, num_kv_pairs=4)
    batch = task.batch(0, 32)
    logits = torch.nn.functional.one_hot(batch.targets.clamp_min(0), 64).float()
    assert task.metrics(logits, batch)["accuracy"].item() == 1.0


@pytest.mark.parametrize("options, message", [
    (dict(seq_len=63), "seq_len must be even"),
    (dict(num_kv_pairs=17, seq_len=64), r"17 pairs x 1 pass\(es\) and their queries need seq_len >= 68, got 64"),
    (dict(num_kv_pairs=8, num_passes=2, seq_len=40), "need seq_len >= 48"),
    (dict(vocab_size=64, seq_len=64), "vocab_size must be > seq_len"),
    (dict(power_a=0), "power_a must be > 0"),
    (dict(power_a="x"), "power_a must be a number, got 'x'"),
    (dict(random_non_queries=1), "random_non_queries must be true or false, got 1"),
    (dict(num_kv_pairs=0), "must be >= 1"),
    (dict(num_train_examples=0), "num_train_examples must be a positive int or null"),
])
def test_impossible_configs_say_why(options, message):
    with pytest.raises(ConfigError, match=message):
        make_task("multiquery_ar", **options)
