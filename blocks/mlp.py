"""Position-wise MLP: gated (GELU or SiLU, as Zamba / Llama) or plain."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blocks.base import Block, BlockConfig, check, linear_flops
from blocks.registry import register

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),  # squared ReLU (Primer; NemotronH)
}


def activation(name: str):
    check(name in ACTIVATIONS, f"activation must be one of {', '.join(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


@dataclass
class MLPConfig(BlockConfig):
    d_ff: int | None = None  # None: 4 * d_model
    activation: str = "gelu"
    gated: bool = True
    bias: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.d_ff = self.d_ff or 4 * self.d_model
        check(self.d_ff > 0, f"mlp: d_ff must be positive, got {self.d_ff}")
        activation(self.activation)


@register("mlp", "F", MLPConfig, kind="mlp")
class MLP(Block):
    """down(act(gate(x)) * up(x)), with gate and up fused into one projection [gate, up]."""

    def __init__(self, config: MLPConfig):
        super().__init__(config)
        c = config
        self.act = activation(c.activation)
        self.up_proj = nn.Linear(c.d_model, (2 if c.gated else 1) * c.d_ff, bias=c.bias)
        self.down_proj = nn.Linear(c.d_ff, c.d_model, bias=c.bias)

    def forward(self, x: torch.Tensor, cache=None, up_delta: torch.Tensor | None = None, **context) -> torch.Tensor:
        """x: (..., d_model). up_delta: optional additive term on the up projection (per-invocation LoRA)."""
        h = self.up_proj(x)
        if up_delta is not None:
            h = h + up_delta
        if self.config.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.act(h))

    def flops_per_token(self, seq_len: int) -> int:
        return linear_flops(self.up_proj, self.down_proj)
