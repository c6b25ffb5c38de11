"""Forgetting across a two-phase schedule: val/phase1_loss through phase 2 and forgetting = after - before."""

import pytest

from hybrids.training.run import train
from tests.test_train import config, metric_rows

TWO_PHASE = ["schedule=two_phase", "trainer.max_steps=12", "trainer.val_every=3", "trainer.val_batches=1",
             "schedule.warmup_steps=2", "schedule.phase2_start=0.5", "schedule.rewarm_steps=2", "optim.lr=0.01",
             "+phase2_task={name: mqar, num_kv_pairs: 6, seq_len: 32, vocab_size: 64, seed: 1}"]


def test_phase1_loss_is_logged_through_phase_2_and_forgetting_is_its_rise(tmp_path, one_thread):
    result = train(config(tmp_path, *TWO_PHASE))
    phase1, val = metric_rows(result.run_dir, "val/phase1_loss"), metric_rows(result.run_dir, "val/loss")
    forgetting = metric_rows(result.run_dir, "forgetting")
    # validations after 3, 6, 9, 12 steps (logged at step index 2, 5, 8, 11); phase 2 starts at step 6
    assert sorted(phase1) == [2, 5, 8, 11]
    assert all(phase1[s] == pytest.approx(val[s], rel=1e-6) for s in phase1)  # MixedTask validates on phase 1
    assert sorted(forgetting) == [8, 11]  # the validation after 6 steps is the last one before phase 2
    assert forgetting[11] == pytest.approx(phase1[11] - phase1[5], rel=1e-5)
    assert result.metrics["forgetting"] == pytest.approx(forgetting[11], rel=1e-6)


def test_schedules_without_phase_2_log_no_forgetting(tmp_path, one_thread):
    result = train(config(tmp_path, "schedule=cosine", "trainer.max_steps=4", "trainer.val_every=2",
                          "trainer.val_batches=1"))
    assert "forgetting" not in result.metrics and "val/phase1_loss" not in result.metrics
    assert "val/loss" in result.metrics
