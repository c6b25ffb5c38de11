"""DDP's options (issue 11): the gradient bucket size and the all-reduce precision, checked as config, as the
strategy Lightning gets, as a hook's numbers, and in a real two-process run on CPU (gloo)."""

import argparse
import importlib
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from blocks import ConfigError
from hybrids.training.config import TrainerConfig, compose, run_name
from hybrids.training.strategy import TunedDDP, bf16_allreduce, make_strategy

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_ddp_options_reach_the_strategy_and_are_no_part_of_a_run():
    from hybrids import HybridLM
    from hybrids.config import ModelConfig

    model = HybridLM(ModelConfig(layout="M:A*", d_model=16, vocab_size=32))
    assert make_strategy(TrainerConfig(strategy="ddp", devices=2), model) == "ddp"  # Lightning's defaults stand
    tuned = make_strategy(TrainerConfig(strategy="ddp", devices=2, ddp_bucket_mb=200, ddp_comm="bf16"), model)
    assert isinstance(tuned, TunedDDP) and tuned.comm_hook is bf16_allreduce
    assert tuned._ddp_kwargs == {"bucket_cap_mb": 200}
    auto = make_strategy(TrainerConfig(strategy="auto", devices=4, ddp_bucket_mb=100), model)
    assert isinstance(auto, TunedDDP) and auto.comm_hook is None and auto._ddp_kwargs == {"bucket_cap_mb": 100}
    common = ["model=mamba-tiny", "trainer.devices=2", "trainer.strategy=ddp", "tracking.enabled=false"]
    assert run_name(compose(common)) == run_name(compose([*common, "trainer.ddp_comm=bf16",
                                                          "trainer.ddp_bucket_mb=100"]))


@pytest.mark.parametrize("overrides, message", [
    (["trainer.ddp_comm=fp16"], "trainer.ddp_comm must be one of fp32, bf16, got 'fp16'"),
    (["trainer.ddp_bucket_mb=0"], "trainer.ddp_bucket_mb must be a positive integer (MiB) or null, got 0"),
    (["trainer.ddp_bucket_mb=1.5"], "trainer.ddp_bucket_mb: Value '1.5' of type 'float' could not be converted"),
    (["trainer.ddp_comm=bf16"], "trainer.ddp_bucket_mb and trainer.ddp_comm apply to DDP (trainer.strategy=ddp, "
                                "or auto over several devices), not to trainer.strategy=auto on 1 device(s)"),
    (["trainer.ddp_bucket_mb=50", "trainer.strategy=fsdp", "trainer.devices=2"],
     "trainer.ddp_bucket_mb and trainer.ddp_comm apply to DDP"),
])
def test_bad_ddp_options_are_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose(["model=mamba-tiny", *overrides])


class _Bucket:
    def __init__(self, buffer):
        self._buffer = buffer

    def buffer(self):
        return self._buffer


def test_bf16_allreduce_rounds_each_gradient_to_bf16_and_keeps_the_buckets_dtype():
    """One rank (world size 1): the hook's result is the fp32 gradient rounded through bf16, in place."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        grads = torch.tensor([1.0, 1 + 2**-10, -3.14159, 1e-3], dtype=torch.float32)
        bucket = _Bucket(grads.clone())
        out = bf16_allreduce(None, bucket).wait()
        assert out.dtype == torch.float32 and out.data_ptr() == bucket.buffer().data_ptr()
        assert torch.equal(out, grads.to(torch.bfloat16).float())
        assert out[1] == 1.0 and out[2] == -3.140625  # bf16 keeps 8 bits of mantissa
    finally:
        dist.destroy_process_group()


def test_two_cpu_processes_train_with_bf16_gradients_close_to_one_process(monkeypatch):
    """A real DDP run (2 gloo processes, global batch 4) with ddp_comm=bf16 and 1 MiB buckets against one process:
    the same losses up to bf16 rounding of the gradients (fp32 DDP agrees to ~5e-7 here; bf16 moves them more)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    multi_gpu = importlib.import_module("multi_gpu")
    args = argparse.Namespace(devices=2, steps=6, batch=4, length=64, tiny=True, ceiling=False, set=[],
                              ddp_set=["trainer.ddp_comm=bf16", "trainer.ddp_bucket_mb=1"])
    out = multi_gpu.ddp(args)
    # step 0: same weights and data; the two-rank loss is the mean of the ranks' half-batch means, equal to the
    # whole batch's mean up to fp32 rounding of that order (one ulp, 4.8e-7, seen in a CI run)
    assert out["steps_compared"] == 6 and out["loss_one"][0] == pytest.approx(out["loss_many"][0], rel=1e-6, abs=0)
    assert 1e-6 < out["max_abs_loss_diff"] < 5e-3
