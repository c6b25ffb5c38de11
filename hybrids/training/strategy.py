"""The Lightning strategy behind `trainer.strategy`.

auto is Lightning's own; ddp is Lightning's DDPStrategy with the gradient bucket size and all-reduce precision of
`trainer.ddp_bucket_mb` and `trainer.ddp_comm` (bf16: `bf16_allreduce`). fsdp shards the model per backbone layer:
each layer of `HybridLM.layers` is its own FSDP unit, gathered for its forward and backward only, while the root unit
holds the embedding (with the LM head tied to it), the final norm and every shared block. A shared block is called
at several depths of one forward: in the root unit, whose parameters stay gathered from the start of the forward to
the end of the backward, every invocation sees the same full weights and their gradients add up in one module, as
without sharding.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from torch import nn


def bf16_allreduce(_state, bucket):
    """A DDP communication hook: the bucket's gradients rounded to bf16 and divided by the world size, summed over
    the ranks in bf16 (half the bytes of fp32), and written back in the bucket's dtype. Unlike PyTorch's own bf16
    hook it also runs on gloo (CPU processes)."""
    buffer = bucket.buffer()
    sent = buffer.to(torch.bfloat16).div_(dist.get_world_size())
    future = dist.all_reduce(sent, async_op=True).get_future()

    def restore(done):
        buffer.copy_(done.value()[0])
        return buffer

    return future.then(restore)


class TunedDDP(DDPStrategy):
    """Lightning's DDPStrategy with a gradient communication hook on every device type: Lightning registers one on
    CUDA only (gloo's CPU processes would silently run plain fp32 all-reduces)."""

    def __init__(self, comm_hook=None, **kwargs):
        super().__init__(**kwargs)
        self.comm_hook = comm_hook

    def _register_ddp_hooks(self) -> None:
        if self.comm_hook is not None:
            self.model.register_comm_hook(state=None, hook=self.comm_hook)


def backbone_layer_policy(model: nn.Module):
    """An FSDP auto-wrap policy that makes each of `model.layers` (and nothing else) a unit of its own."""
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    layers = {id(layer) for layer in model.layers}
    return functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda module: id(module) in layers)


def make_strategy(trainer, model: nn.Module):
    """`trainer.strategy` (a TrainerConfig) as Lightning takes it: "auto" or "ddp" by name where DDP's defaults
    stand, else a DDPStrategy or an FSDPStrategy. (TrainerConfig refuses the DDP options where no DDP runs.)"""
    if trainer.strategy == "fsdp":
        return FSDPStrategy(auto_wrap_policy=backbone_layer_policy(model), sharding_strategy="FULL_SHARD",
                            use_orig_params=True)
    if trainer.ddp_bucket_mb is None and trainer.ddp_comm == "fp32":
        return trainer.strategy
    kwargs = {} if trainer.ddp_bucket_mb is None else {"bucket_cap_mb": trainer.ddp_bucket_mb}
    if trainer.ddp_comm == "bf16":
        kwargs["comm_hook"] = bf16_allreduce
    return TunedDDP(**kwargs)
