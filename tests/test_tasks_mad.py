"""The six MAD tasks against mad-lab's definitions: vocabulary layout, structure, noise fraction, motifs, which
positions are scored in training and at test time, baseline defaults, fixed train sets repeated over epochs."""

import pytest
import torch

from blocks import ConfigError
from hybrids.training.tasks import IGNORE_INDEX, make_task

SMALL = dict(num_train_examples=300, num_test_examples=200)


def pairs_of(ids: list[int]) -> list[tuple[int, int]]:
    return list(zip(ids[0::2], ids[1::2], strict=False))


def runs(ids: list[int], is_key) -> list[tuple[bool, tuple[int, ...]]]:
    """Maximal runs of key tokens and of value tokens: [(is_key_run, tokens), ...]."""
    out: list[tuple[bool, tuple[int, ...]]] = []
    for t in ids:
        if out and out[-1][0] == is_key(t):
            out[-1] = (out[-1][0], out[-1][1] + (t,))
        else:
            out.append((is_key(t), (t,)))
    return out


@pytest.mark.parametrize("name, expected", [
    ("in_context_recall", dict(vocab_size=16, seq_len=128, num_train_examples=12800, multi_query=True,
                               noise_vocab_size=0, frac_noise=0.0)),
    ("fuzzy_in_context_recall", dict(vocab_size=16, seq_len=128, k_motif_size=3, v_motif_size=3)),
    ("noisy_in_context_recall", dict(vocab_size=32, noise_vocab_size=16, frac_noise=0.2, seq_len=128)),
    ("selective_copying", dict(vocab_size=16, seq_len=256, num_tokens_to_copy=16, num_train_examples=12800)),
    ("compression", dict(vocab_size=16, seq_len=32, num_train_examples=12800)),
    ("memorization", dict(vocab_size=256, seq_len=32, num_train_examples=256)),
])
def test_defaults_are_mads_baselines(name, expected):
    config = make_task(name).config
    assert {k: getattr(config, k) for k in expected} == expected
    assert config.num_test_examples == 1280


def test_in_context_recall_structure_and_targets():
    task = make_task("in_context_recall", **SMALL)
    assert (task.key_ids, task.value_ids, task.seq_len) == (range(0, 8), range(8, 16), 127)
    train, test = task.fixed_set("train"), task.fixed_set("test")
    assert train.input_ids.shape == (300, 127) and test.input_ids.shape == (200, 127)
    # training: the next token everywhere (MAD's inputs[1:])
    assert torch.equal(train.targets[:, :-1], train.input_ids[:, 1:])
    for ids, tgt in zip(test.input_ids.long().tolist(), test.targets.long().tolist(), strict=True):
        full = ids + [tgt[-1]]  # the dropped last token is the probe's value, the last target
        value_of: dict[int, int] = {}
        for i, (k, v) in enumerate(pairs_of(full)):
            assert k in task.key_ids and v in task.value_ids
            assert value_of.setdefault(k, v) == v  # a key keeps its value within the sequence
            # the key's position is scored with its value iff the key was shown before (multi-query)
            expected = v if k in dict(pairs_of(full)[:i]) else IGNORE_INDEX
            assert tgt[2 * i] == expected
        assert all(tgt[t] == IGNORE_INDEX for t in range(1, 127, 2))  # values' positions are never scored
        assert tgt[-1] != IGNORE_INDEX  # the probe: a key shown before


def test_in_context_recall_probe_is_uniform_over_distinct_shown_keys():
    task = make_task("in_context_recall", seq_len=8, num_test_examples=3000, num_train_examples=1)
    rows = task.fixed_set("test").input_ids.long().tolist()  # k1 v1 k2 v2 k3 v3 probe
    distinct = [r for r in rows if len(set(r[0:6:2])) == 3]
    repeated = [r for r in rows if len(set(r[0:6:2])) == 2]
    assert all(r[6] in r[0:6:2] for r in rows)
    slot = torch.bincount(torch.tensor([r[0:6:2].index(r[6]) for r in distinct]), minlength=3).double()
    assert (slot / slot.sum() - 1 / 3).abs().max() < 0.035
    # keys (a, a, b): the probe is a with probability 1/2 (uniform over keys), not 2/3 (uniform over slots)
    twice = [max(set(r[0:6:2]), key=r[0:6:2].count) for r in repeated]
    share = sum(r[6] == k for r, k in zip(repeated, twice, strict=True)) / len(repeated)
    assert len(repeated) > 700 and share == pytest.approx(0.5, abs=0.055)


def test_single_query_recall_has_a_copy_prefix():
    task = make_task("in_context_recall", multi_query=False, **SMALL)
    assert task.seq_len == 128 and (task.key_ids, task.value_ids) == (range(0, 7), range(7, 15))
    test = task.fixed_set("test")
    assert (test.input_ids[:, -2] == 15).all()  # copy prefix, then the probe key
    scored = test.targets != IGNORE_INDEX
    assert scored[:, -1].all() and scored.sum().item() == 200  # only the probe's value


def test_noisy_recall_noise_fraction_and_scoring():
    task = make_task("noisy_in_context_recall", num_train_examples=1, num_test_examples=2000)
    assert (task.key_ids, task.value_ids, task.noise_ids) == (range(0, 8), range(8, 16), range(16, 32))
    test = task.fixed_set("test")
    ids, tgt = test.input_ids.long(), test.targets.long()
    slots = ids[:, :126].reshape(2000, 63, 2)
    noise = slots >= 16
    assert torch.equal(noise[..., 0], noise[..., 1])  # noise comes as whole pairs
    # each of the 63 slots is noise with probability 0.2, except one slot in 64 kept a key-value pair
    assert noise[..., 0].float().mean().item() == pytest.approx(0.2 * (1 - 1 / 64), abs=0.006)
    assert (tgt[:, :126].reshape(2000, 63, 2)[noise] == IGNORE_INDEX).all()  # noise is never scored at test
    assert not noise[..., 0].all(dim=1).any()
    noise_tokens = torch.bincount(slots[noise] - 16, minlength=16).double()
    assert (noise_tokens / noise_tokens.sum() - 1 / 16).abs().max() < 0.01  # uniform noise tokens


def test_fuzzy_recall_motifs_and_scoring():
    task = make_task("fuzzy_in_context_recall", num_train_examples=200, num_test_examples=200)
    assert (task.key_ids, task.value_ids, task.pad_id) == (range(0, 7), range(7, 15), 15)
    key_lengths: list[int] = []
    for split in ("train", "test"):
        data = task.fixed_set(split)
        assert data.input_ids.shape == (200, 128)
        for ids, tgt in zip(data.input_ids.long().tolist(), data.targets.long().tolist(), strict=True):
            full = ids + [tgt[-1]]  # the dropped last token is the probe value's last token, the last target
            body = [t for t in full if t != 15]
            assert full[: len(full) - len(body)] == [15] * (len(full) - len(body))  # left padding only
            motifs = runs(body, lambda t: t < 7)
            assert [r[0] for r in motifs] == [True, False] * (len(motifs) // 2) + [True] * (len(motifs) % 2)
            value_of: dict[tuple[int, ...], tuple[int, ...]] = {}
            for key, value in zip(motifs[0::2], motifs[1::2], strict=False):
                assert len(set(key[1])) == len(key[1]) <= 3 and len(set(value[1])) == len(value[1]) <= 3
                assert value_of.setdefault(key[1], value[1]) == value[1]
                if split == "train":
                    key_lengths.append(len(key[1]))
                else:
                    assert len(key[1]) == 3  # test keys always have k_motif_size tokens
            if split == "train":
                assert tgt[:-1] == ids[1:]
                continue
            # test: a value is scored iff its key was shown before, and the final probe's value always
            expected = [IGNORE_INDEX] * (len(full) - len(body))
            pairs = list(zip(motifs[0::2], motifs[1::2], strict=True))
            for i, ((_, key), (_, value)) in enumerate(pairs):
                asked = i == len(pairs) - 1 or key in {k for (_, k), _ in pairs[:i]}
                expected += [IGNORE_INDEX] * len(key) + (list(value) if asked else [IGNORE_INDEX] * len(value))
            assert tgt == expected[1:]
    counts = torch.bincount(torch.tensor(key_lengths), minlength=4)[1:].double()
    assert (counts / counts.sum() - 1 / 3).abs().max() < 0.05  # train key motifs: 1, 2 or 3 tokens


def test_selective_copying_structure():
    task = make_task("selective_copying", seq_len=64, num_tokens_to_copy=8, **SMALL)
    assert (task.data_ids, task.blank_id, task.copy_id, task.seq_len) == (range(0, 14), 14, 15, 64)
    data = task.fixed_set("train")
    ids, tgt = data.input_ids.long(), data.targets.long()
    assert (ids[:, 55] == 15).all() and (ids[:, 56:] == 14).all()
    assert (tgt[:, :56] == IGNORE_INDEX).all()
    copied = ids[:, :55][ids[:, :55] != 14].reshape(300, 8)
    assert torch.equal(tgt[:, 56:], copied)  # the data tokens in order
    assert (ids[:, 54] != 14).all()  # MAD inserts blanks only before data tokens
    assert torch.equal(task.fixed_set("test").targets[:, 56:] != IGNORE_INDEX, torch.ones(200, 8, dtype=torch.bool))
    # 47 blanks, each before a uniformly chosen data token: 47 / 8 before each on average
    before_first = (ids[:, :55] != 14).int().argmax(dim=1).double()
    assert before_first.mean().item() == pytest.approx(47 / 8, abs=0.6)


def test_compression_layout():
    task = make_task("compression", seq_len=8, **SMALL)
    assert task.seq_len == 15 and task.compression_id == 15
    batch = task.batch(0, 50)
    ids, tgt = batch.input_ids, batch.targets
    assert (ids[:, :7] < 15).all() and (ids[:, 7:] == 15).all()
    assert (tgt[:, :7] == IGNORE_INDEX).all() and torch.equal(tgt[:, 7:14], ids[:, :7]) and (tgt[:, 14] == 15).all()
    assert torch.equal(task.batch(0, 50, "val").targets[:, 7:14], task.batch(0, 50, "val").input_ids[:, :7])


def test_memorization_fixed_map_and_scoring():
    task = make_task("memorization")
    assert (task.key_ids, task.value_ids, task.insert_id) == (range(0, 127), range(127, 255), 255)
    assert len(set(task.value_of.tolist())) == 127 and all(v in task.value_ids for v in task.value_of.tolist())
    for split in ("train", "val"):
        batch = task.batch(0, 128, split)
        keys, insert = batch.input_ids[:, 0::2], batch.input_ids[:, 1::2]
        assert (insert == 255).all() and (keys < 127).all()
        assert (batch.targets[:, 0::2] == IGNORE_INDEX).all()
        assert torch.equal(batch.targets[:, 1::2], task.value_of[keys])  # the same map in every example and split
    assert not torch.equal(task.value_of, make_task("memorization", seed=1).value_of)
    assert torch.equal(task.value_of, make_task("memorization").value_of)


def test_fixed_train_set_is_repeated_in_a_new_order_each_epoch():
    task = make_task("memorization")  # 256 train examples
    epochs = [torch.cat([task.batch(2 * e + i, 128).input_ids for i in range(2)]) for e in range(3)]
    as_set = [{tuple(r) for r in x.tolist()} for x in epochs]
    assert len(as_set[0]) == 256 and as_set[0] == as_set[1] == as_set[2]
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    # a batch that straddles two epochs: the end of epoch 0's order, then the start of epoch 1's
    straddle = task.batch(1, 200).input_ids
    assert torch.equal(straddle[:56], epochs[0][200:]) and torch.equal(straddle[56:], epochs[1][:144])
    test = {tuple(r) for r in task.fixed_set("test").input_ids.long().tolist()}
    assert len(test) == 1280 and not test <= as_set[0]


@pytest.mark.parametrize("name", ["in_context_recall", "fuzzy_in_context_recall", "selective_copying",
                                  "compression", "memorization"])
def test_deterministic_per_seed(name):
    options = dict(SMALL, seq_len=64) if name != "memorization" else {}
    a, b = make_task(name, **options), make_task(name, **options)
    assert torch.equal(a.batch(3, 32).input_ids, b.batch(3, 32).input_ids)
    assert torch.equal(a.batch(1, 32, "val").targets, b.batch(1, 32, "val").targets)
    assert not torch.equal(a.batch(3, 32).input_ids, make_task(name, **options, seed=5).batch(3, 32).input_ids)


@pytest.mark.parametrize("name, options, message", [
    ("in_context_recall", dict(seq_len=127), "seq_len must be even"),
    ("in_context_recall", dict(frac_noise=1.0, noise_vocab_size=4), r"frac_noise must be in \[0, 1\)"),
    ("in_context_recall", dict(frac_noise=0.3), "needs noise_vocab_size > 0"),
    ("noisy_in_context_recall", dict(noise_vocab_size=32), "noise_vocab_size 32 must be smaller than vocab_size 32"),
    ("noisy_in_context_recall", dict(noise_vocab_size=31), "use vocab_size >= 33"),
    ("fuzzy_in_context_recall", dict(vocab_size=6), "use vocab_size >= 7"),
    ("fuzzy_in_context_recall", dict(seq_len=12), "need seq_len >= 13"),
    ("fuzzy_in_context_recall", dict(k_motif_size=0), "must be >= 1"),
    ("selective_copying", dict(num_tokens_to_copy=128), r"need seq_len > 257"),
    ("selective_copying", dict(vocab_size=2), "use vocab_size >= 3"),
    ("memorization", dict(seq_len=31), "seq_len must be even"),
    ("compression", dict(seq_len=1), "needs seq_len >= 2"),
    ("compression", dict(num_test_examples=-1), "num_test_examples must be a positive int or null"),
    ("in_context_recall", dict(multi_query="yes"), "multi_query must be true or false"),
])
def test_impossible_configs_say_why(name, options, message):
    with pytest.raises(ConfigError, match=message):
        make_task(name, **options)
