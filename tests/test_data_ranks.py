"""Several processes (DDP, FSDP) see the data of one: each rank trains on its slice of the global batch of the step,
and the ranks' slices, in rank order, are that batch (issue 11)."""

from types import SimpleNamespace

import pytest
import torch

from blocks import ConfigError
from hybrids.training.config import compose
from hybrids.training.data import make_task, rank_slice
from hybrids.training.run import prepare


@pytest.mark.parametrize("task", [{"name": "mqar", "num_kv_pairs": 4, "seq_len": 32, "vocab_size": 64},
                                  {"name": "long_copy", "distances": [8, 16], "seq_len": 48}])
@pytest.mark.parametrize("world_size", [2, 4])
def test_the_ranks_slices_make_up_the_one_process_batch(task, world_size):
    data = make_task(task)
    for step in (0, 7):
        whole = data.batch(step, 8, "train")  # what one process trains on at this step
        parts = [rank_slice(data.batch(step, 8, "train"), rank, world_size) for rank in range(world_size)]
        assert [p.input_ids.shape[0] for p in parts] == [8 // world_size] * world_size
        assert torch.equal(torch.cat([p.input_ids for p in parts]), whole.input_ids)
        assert torch.equal(torch.cat([p.targets for p in parts]), whole.targets)
        for key, value in whole.extra.items():  # long_copy's per-example distances travel with their rows
            assert torch.equal(torch.cat([p.extra[key] for p in parts]), value)
        assert not torch.equal(parts[0].input_ids, parts[1].input_ids)


def test_a_global_batch_that_does_not_divide_over_the_ranks_is_refused():
    batch = make_task({"name": "mqar", "num_kv_pairs": 4, "seq_len": 32, "vocab_size": 64}).batch(0, 6)
    with pytest.raises(ConfigError, match=r"^trainer.batch_size = 6 \(the global batch\) must be a multiple of the "
                                          r"number of processes \(4 = trainer.devices x trainer.num_nodes\)$"):
        rank_slice(batch, 0, 4)


def test_the_module_trains_on_its_ranks_slice():
    config = compose(["model=mamba-tiny", "task.num_kv_pairs=4", "task.seq_len=32", "task.vocab_size=64",
                      "trainer.batch_size=8", "trainer.devices=2", "tracking.enabled=false"])
    module, _ = prepare(config)
    whole = module.task.batch(3, 8, "train")
    for rank in (0, 1):
        module.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        mine = module._to_device(module.task.batch(3, 8, "train"))
        assert torch.equal(mine.input_ids, whole.input_ids[4 * rank: 4 * (rank + 1)])


def test_fsdp_makes_each_backbone_layer_a_unit_and_keeps_shared_blocks_and_tied_weights_in_the_root():
    from lightning.pytorch.strategies import FSDPStrategy

    from hybrids import HybridLM
    from hybrids.config import ModelConfig
    from hybrids.training.config import TrainerConfig
    from hybrids.training.strategy import backbone_layer_policy, make_strategy

    model = HybridLM(ModelConfig(layout="2M:A*:2M:A*", d_model=32, vocab_size=64, tie_embeddings=True))
    policy = backbone_layer_policy(model)
    units = [name for name, module in model.named_modules() if policy(module, recurse=False, nonwrapped_numel=0)]
    assert units == [f"layers.{i}" for i in range(4)]  # not the shared block (called twice), embedding or head
    assert make_strategy(TrainerConfig(strategy="ddp", devices=2), model) == "ddp"
    assert isinstance(make_strategy(TrainerConfig(strategy="fsdp", devices=2), model), FSDPStrategy)
