"""Document boundaries in the LM data path: document ids from the separators, two-phase mixes, the
data.reset_at_boundaries flag from the config to the model's forward and into the run's record."""

import pytest
import torch

from blocks import ConfigError
from hybrids.model import HybridLM
from hybrids.training.config import compose
from hybrids.training.data import MixedTask, make_task
from hybrids.training.run import train
from hybrids.training.schedules import ScheduleConfig, build_schedule


@pytest.fixture
def lm_config(tmp_path) -> dict:
    """An LM task over eight short documents (separator 256 after each), in windows of 40 tokens."""
    for i, n in enumerate((30, 55, 20, 41, 12, 67, 25, 38)):
        (tmp_path / f"{i}.txt").write_text(chr(ord("a") + i) * n)
    return {"name": "lm", "sources": [str(tmp_path)], "seq_len": 40, "val_fraction": 0.3,
            "cache_dir": str(tmp_path / "cache")}


def test_lm_batches_carry_document_ids_from_the_separators(lm_config):
    task = make_task(lm_config)
    batch = task.batch(2, 4)
    assert batch.doc_ids.shape == batch.input_ids.shape == (4, 40)
    for ids, doc in zip(batch.input_ids, batch.doc_ids, strict=True):
        ends = (ids == 256).nonzero().flatten().tolist()
        assert doc[0] == 0 and all(doc[t] == doc[t - 1] for t in range(1, 40) if t - 1 not in ends)
        assert all(doc[t + 1] == doc[t] + 1 for t in ends if t + 1 < 40)  # the separator closes its document
        assert len(set(ids[doc == doc[-1]].tolist()) - {256}) <= 1  # each document holds one letter
    assert torch.equal(task.batch(2, 4).doc_ids, batch.doc_ids)  # still a pure function of the step
    assert make_task(lm_config, reset_at_boundaries=False).batch(2, 4).doc_ids is None
    assert make_task({"name": "mqar"}).batch(0, 2).doc_ids is None  # one example per row


def test_mixed_batches_give_rows_without_ids_one_document(lm_config):
    schedule = build_schedule(ScheduleConfig(name="two_phase", phase2_start=0.5, replay_fraction=0.5,
                                              rewarm_steps=1), 10, tokens_per_step=160)
    mixed = MixedTask(make_task(lm_config), make_task(lm_config, reset_at_boundaries=False), schedule)
    batch = mixed.batch(5, 4)
    assert batch.doc_ids.shape == (4, 40) and (batch.doc_ids[2:] == 0).all() and (batch.doc_ids[:2] > 0).any()


def test_the_flag_is_a_data_setting_recorded_with_the_config(lm_config):
    assert compose(["task=lm"]).data.reset_at_boundaries is True
    assert compose(["task=lm", "data.reset_at_boundaries=false"]).data.reset_at_boundaries is False
    with pytest.raises(ConfigError, match="set data.reset_at_boundaries"):
        make_task({**lm_config, "reset_at_boundaries": False})


@pytest.mark.parametrize("reset", [True, False])
def test_an_lm_run_feeds_document_ids_to_the_model_and_records_the_flag(lm_config, tmp_path, monkeypatch, reset,
                                                                        one_thread):
    seen, forward = [], HybridLM.forward

    def spy(self, input_ids, *args, doc_ids=None, **kwargs):
        seen.append(doc_ids is not None)
        return forward(self, input_ids, *args, doc_ids=doc_ids, **kwargs)

    monkeypatch.setattr(HybridLM, "forward", spy)
    result = train(compose([
        "model=mamba2-tiny", "task=lm", f"task.sources=[{lm_config['sources'][0]}]", "task.seq_len=40",
        "task.val_fraction=0.3", f"+task.cache_dir={lm_config['cache_dir']}", "trainer.max_steps=2",
        "schedule.warmup_steps=0", "trainer.batch_size=2", "trainer.val_every=2", "trainer.val_batches=1",
        "trainer.progress_bar=false", "tracking.enabled=false", f"run.dir={tmp_path}/train",
        f"data.reset_at_boundaries={str(reset).lower()}"]))
    assert seen and set(seen) == {reset}
    assert f"reset_at_boundaries: {str(reset).lower()}" in (result.run_dir / "config.yaml").read_text()
