"""Batches built ahead by DataLoader workers are the batches of the loop's own steps: same data, same loss curve,
and a resumed run's workers start at its resumed step."""

import pytest
import torch

from blocks import ConfigError
from hybrids.training.config import compose
from hybrids.training.data import make_task, rank_slice
from hybrids.training.prefetch import data_workers, step_loader
from hybrids.training.run import train
from tests.test_train import Crash, config, metric_rows


def test_two_workers_hand_over_the_steps_in_order_each_the_step_s_own_batch():
    task = make_task({"name": "mqar", "vocab_size": 64, "seq_len": 32, "num_kv_pairs": 4})
    loader = iter(step_loader(task, batch_size=8, start=5, rank=1, world_size=2, workers=2))
    for expected in range(5, 12):
        step, batch = next(loader)
        want = rank_slice(task.batch(expected, 8, "train"), 1, 2)
        assert step == expected
        assert torch.equal(batch.input_ids, want.input_ids) and torch.equal(batch.targets, want.targets)


def test_auto_means_workers_on_cuda_only_and_a_bad_setting_is_one_line():
    assert data_workers("auto", on_cuda=False) == 0 and data_workers("auto", on_cuda=True) >= 1
    assert data_workers(3, on_cuda=False) == 3
    with pytest.raises(ConfigError, match="trainer.data_workers must be auto or an integer >= 0, got -1"):
        compose(["trainer.data_workers=-1"])


def test_a_run_with_data_workers_has_the_loss_curve_of_one_without_and_resumes_on_it(tmp_path):
    common = ["trainer.max_steps=12", "trainer.ckpt_every=5", "trainer.val_every=100"]
    inline = train(config(tmp_path / "a", *common, "trainer.data_workers=0"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config(tmp_path / "b", *common, "trainer.data_workers=2"), callbacks=[Crash(8)])
    resumed = train(config(tmp_path / "b", *common, "trainer.data_workers=2"))
    assert resumed.resumed_from.endswith("last.ckpt") and resumed.steps == 12
    a, b = metric_rows(inline.run_dir, "train/loss"), metric_rows(resumed.run_dir, "train/loss")
    assert set(range(12)) <= set(b)
    for step in range(12):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step
