"""Mixture-of-experts MLP: softmax router, top-k experts, load-balancing loss.

Token dropping: with `capacity_factor` None (the default) the layer is dropless, every token reaches
its top_k experts. With a capacity factor, each expert takes at most
ceil(capacity_factor * tokens * top_k / n_experts) assignments, earliest positions first (position
order, flattened over the batch); the assignments over capacity contribute nothing, so the token keeps
only its residual path and its other experts. `dropped_fraction` reports the share dropped.

With `shared_d_ff` > 0 a gated MLP of that width (a shared expert, as GraniteMoeHybrid's shared_mlp) runs on
every token beside the routed experts and its output is added to theirs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blocks.base import Block, BlockConfig, check
from blocks.mlp import MLP, MLPConfig, activation
from blocks.registry import register


@dataclass
class MoEConfig(BlockConfig):
    d_ff: int | None = None  # per expert; None: 4 * d_model
    n_experts: int = 16
    top_k: int = 2
    activation: str = "silu"
    normalize_top_k: bool = False  # Jamba: False (weights are the full-softmax probabilities)
    capacity_factor: float | None = None  # None: dropless
    shared_d_ff: int = 0  # > 0: a shared expert (gated MLP of this width) on every token

    def __post_init__(self) -> None:
        super().__post_init__()
        self.d_ff = self.d_ff or 4 * self.d_model
        check(0 < self.top_k <= self.n_experts,
              f"moe: top_k must be in 1..n_experts = {self.n_experts}, got {self.top_k}")
        check(self.capacity_factor is None or self.capacity_factor > 0,
              f"moe: capacity_factor must be positive or None, got {self.capacity_factor}")
        check(self.shared_d_ff >= 0, f"moe: shared_d_ff must be >= 0, got {self.shared_d_ff}")
        activation(self.activation)


@register("moe", "E", MoEConfig, kind="mlp")
class MoE(Block):
    static_step = False  # routing reads the chosen experts back to the host

    def __init__(self, config: MoEConfig):
        super().__init__(config)
        c = config
        self.act = activation(c.activation)
        self.router = nn.Linear(c.d_model, c.n_experts, bias=False)
        self.up_proj = nn.Parameter(torch.empty(c.n_experts, 2 * c.d_ff, c.d_model))  # [gate, up] per expert
        self.down_proj = nn.Parameter(torch.empty(c.n_experts, c.d_model, c.d_ff))
        self.shared = MLP(MLPConfig(c.d_model, c.shared_d_ff, c.activation)) if c.shared_d_ff else None
        self._aux_loss: torch.Tensor | None = None
        self.dropped_fraction = 0.0
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for w in (self.up_proj, self.down_proj):
            bound = w.shape[-1] ** -0.5
            nn.init.uniform_(w, -bound, bound)

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        """The router and every expert's projections N(0, std), as HF's Jamba (its experts are Linears)."""
        super().init_weights(std)
        for w in (self.up_proj, self.down_proj):
            nn.init.normal_(w, 0.0, std)

    def route(self, x: torch.Tensor):
        """x: (T, d_model) -> router probabilities (T, E) fp32, top-k weights (T, k) and experts (T, k)."""
        probs = F.softmax(self.router(x).float(), dim=-1)
        weights, experts = probs.topk(self.config.top_k, dim=-1)
        if self.config.normalize_top_k:
            weights = weights / weights.sum(-1, keepdim=True)
        return probs, weights, experts

    def _keep_mask(self, experts: torch.Tensor) -> torch.Tensor:
        """(T, k) bool: which assignments fit their expert's capacity, earliest tokens first."""
        c = self.config
        capacity = math.ceil(c.capacity_factor * experts.numel() / c.n_experts)
        onehot = F.one_hot(experts.flatten(), c.n_experts)  # (T*k, E), token-major order
        rank = (onehot.cumsum(0) * onehot).sum(-1) - 1  # position of each assignment in its expert's queue
        return (rank < capacity).view_as(experts)

    def forward(self, x: torch.Tensor, cache=None, **context) -> torch.Tensor:
        c = self.config
        flat = x.reshape(-1, c.d_model)
        probs, weights, experts = self.route(flat)
        keep = self._keep_mask(experts) if c.capacity_factor is not None else torch.ones_like(experts, dtype=torch.bool)
        self.dropped_fraction = 1.0 - keep.float().mean().item() if c.capacity_factor is not None else 0.0
        self._aux_loss = load_balancing_loss(probs, experts, c.n_experts)

        out = torch.zeros_like(flat)
        token_idx = torch.arange(flat.shape[0], device=x.device)[:, None].expand_as(experts)
        for e in experts[keep].unique().tolist():
            sel = (experts == e) & keep
            tokens, w = token_idx[sel], weights[sel]
            gate, up = F.linear(flat[tokens], self.up_proj[e]).chunk(2, dim=-1)
            y = F.linear(self.act(gate) * up, self.down_proj[e])
            out.index_add_(0, tokens, (y * w[:, None]).to(out.dtype))
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.view_as(x)

    def aux_loss(self) -> torch.Tensor | None:
        return self._aux_loss

    def flops_per_token(self, seq_len: int) -> int:
        c = self.config
        shared = self.shared.flops_per_token(seq_len) if self.shared is not None else 0
        return 2 * c.d_model * c.n_experts + c.top_k * 2 * 3 * c.d_model * c.d_ff + shared


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch-Transformer balance loss as HF computes it for Jamba/Mixtral.

    n_experts * sum over slots k and experts e of (fraction of tokens whose k-th choice is e) * (mean
    router probability of e). Equals top_k when routing is perfectly balanced.
    """
    chosen = F.one_hot(experts, n_experts).float()  # (T, k, E)
    return n_experts * (chosen.mean(0) * probs.mean(0)[None]).sum()
