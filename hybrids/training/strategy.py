"""The Lightning strategy behind `trainer.strategy`.

ddp and auto are Lightning's own. fsdp shards the model per backbone layer: each layer of `HybridLM.layers` is its own
FSDP unit, gathered for its forward and backward only, while the root unit holds the embedding (with the LM head tied
to it), the final norm and every shared block. A shared block is called at several depths of one forward: in the
root unit, whose parameters stay gathered from the start of the forward to the end of the backward, every
invocation sees the same full weights and their gradients add up in one module, as without sharding.
"""

from __future__ import annotations

import functools

from torch import nn


def backbone_layer_policy(model: nn.Module):
    """An FSDP auto-wrap policy that makes each of `model.layers` (and nothing else) a unit of its own."""
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    layers = {id(layer) for layer in model.layers}
    return functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda module: id(module) in layers)


def make_strategy(name: str, model: nn.Module):
    """`trainer.strategy` as Lightning takes it: the name for auto and ddp, an FSDPStrategy for fsdp."""
    if name != "fsdp":
        return name
    from lightning.pytorch.strategies import FSDPStrategy

    return FSDPStrategy(auto_wrap_policy=backbone_layer_policy(model), sharding_strategy="FULL_SHARD",
                        use_orig_params=True)
