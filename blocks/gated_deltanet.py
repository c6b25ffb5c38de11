"""Gated DeltaNet mixer (Yang, Kautz, Hatamizadeh 2024; flash-linear-attention's `GatedDeltaNet` layer).

Per head: q, k, v from short causal convs + SiLU, q and k L2-normalised; a decay alpha = exp(g) with
g = -exp(A_log) * softplus(a + dt_bias) (Mamba2's parametrisation) and a write strength beta = sigmoid(b);
the state S (head_dim, d_v) follows the gated delta rule (`blocks.ops.delta_rule`); the read-out is
RMS-normalised per head, gated by silu(z) and projected back to d_model.

Projection layout: in_proj -> [q, k, v, z, a, b]; one depthwise causal conv runs over [q, k, v] (the same
weights as three separate convs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from blocks import ops
from blocks.base import Block, BlockConfig, RecurrentCache, check, linear_flops, state_dtype, upcast
from blocks.mamba2 import init_decay
from blocks.ops.fla_kernels import check_backend
from blocks.registry import register


@dataclass
class GatedDeltaNetConfig(BlockConfig):
    n_heads: int = 4
    head_dim: int | None = None  # d_k of a head; None: d_model // n_heads
    expand_v: float = 2.0  # d_v = expand_v * head_dim
    d_conv: int = 4
    conv_bias: bool = False
    norm_eps: float = 1e-5
    chunk_size: int = 64  # the PyTorch path's chunk (fla's kernel uses 64); results do not depend on it
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    A_init_range: tuple[float, float] = (1.0, 16.0)
    backend: str = "auto"  # auto | torch | fla

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.n_heads > 0 and self.d_conv > 0 and self.chunk_size > 0,
              "gated_deltanet: n_heads, d_conv and chunk_size must be positive")
        if self.head_dim is None:
            check(self.d_model % self.n_heads == 0,
                  f"gated_deltanet: d_model = {self.d_model} is not divisible by n_heads = {self.n_heads}")
            self.head_dim = self.d_model // self.n_heads
        check(self.head_dim > 0, f"gated_deltanet: head_dim must be positive, got {self.head_dim}")
        check(self.expand_v > 0 and math.isclose(self.expand_v * self.head_dim, round(self.expand_v * self.head_dim)),
              f"gated_deltanet: expand_v * head_dim = {self.expand_v} * {self.head_dim} must be a positive integer")
        self.A_init_range = tuple(self.A_init_range)
        check_backend(self.backend)

    @property
    def d_v(self) -> int:
        return round(self.expand_v * self.head_dim)

    @property
    def key_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def value_dim(self) -> int:
        return self.n_heads * self.d_v

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim


class HeadGatedRMSNorm(nn.Module):
    """rmsnorm(x) * weight * silu(z) within each head (one weight of head size for all heads): normalise,
    then gate, as flash-linear-attention's FusedRMSNormGated (Mamba2's GatedRMSNorm gates first)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x, z: (..., H, dim) -> (..., H, dim) in x's dtype, computed in fp32 or wider."""
        x32 = upcast(x)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x32 * F.silu(upcast(z))).to(x.dtype)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, in fp32 or wider (as fla's l2norm)."""
    x = upcast(x)
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


@register("gated_deltanet", "G", GatedDeltaNetConfig, kind="mixer")
class GatedDeltaNet(Block):
    def __init__(self, config: GatedDeltaNetConfig):
        super().__init__(config)
        c = config
        self.in_proj = nn.Linear(c.d_model, c.conv_dim + c.value_dim + 2 * c.n_heads, bias=False)
        self.conv1d = nn.Conv1d(c.conv_dim, c.conv_dim, c.d_conv, groups=c.conv_dim, bias=c.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(c.n_heads))
        self.A_log = nn.Parameter(torch.empty(c.n_heads))
        self.norm = HeadGatedRMSNorm(c.d_v, c.norm_eps)
        self.out_proj = nn.Linear(c.value_dim, c.d_model, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init_decay(self.dt_bias, self.A_log, self.config)

    def _split(self, projected: torch.Tensor):
        c = self.config
        return projected.split([c.conv_dim, c.value_dim, c.n_heads, c.n_heads], dim=-1)

    def _heads(self, qkv: torch.Tensor):
        """(..., conv_dim) after the conv -> q, k (..., H, head_dim) L2-normalised, v (..., H, d_v)."""
        c = self.config
        q, k, v = qkv.split([c.key_dim, c.key_dim, c.value_dim], dim=-1)
        q, k = (l2_normalize(t.unflatten(-1, (c.n_heads, c.head_dim))).to(qkv.dtype) for t in (q, k))
        return q, k, v.unflatten(-1, (c.n_heads, c.d_v))

    def _gates(self, a: torch.Tensor, b: torch.Tensor):
        """log decay g = -exp(A_log) * softplus(a + dt_bias) <= 0 and beta = sigmoid(b), both (..., H) fp32."""
        g = -torch.exp(upcast(self.A_log)) * F.softplus(upcast(a) + upcast(self.dt_bias))
        return g, torch.sigmoid(upcast(b))

    def forward(self, x: torch.Tensor, cache: RecurrentCache | None = None, doc_ids: torch.Tensor | None = None,
                **context) -> torch.Tensor:
        """x: (B, L, d_model) -> (B, L, d_model); doc_ids (B, L): conv and state reset at document starts."""
        c = self.config
        qkv, z, a, b = self._split(self.in_proj(x))
        qkv = rearrange(qkv, "b l d -> b d l")
        if cache is not None:
            cache.conv.copy_(ops.conv_state_from(qkv, c.d_conv))
        # F.conv1d's depthwise conv: the mamba-ssm conv kernel is no dependency of this block
        qkv = ops.causal_conv1d(qkv, self.conv1d.weight[:, 0], self.conv1d.bias, "silu", backend="torch",
                                doc_ids=doc_ids)
        q, k, v = self._heads(rearrange(qkv, "b d l -> b l d"))  # (B, L, H, K), (B, L, H, K), (B, L, H, V)
        g, beta = self._gates(a, b)  # (B, L, H)
        o = ops.gated_delta_rule(q, k, v, g, beta, c.chunk_size, return_final_state=cache is not None,
                                 backend=c.backend, doc_ids=doc_ids)
        if cache is not None:
            o, state = o
            cache.ssm.copy_(state)
        o = self.norm(o, z.unflatten(-1, (c.n_heads, c.d_v)))
        return self.out_proj(o.flatten(-2))

    def allocate_cache(self, batch, max_seqlen, device=None, dtype=None) -> RecurrentCache:
        c = self.config
        dtype = dtype or self.in_proj.weight.dtype
        return RecurrentCache(
            conv=torch.zeros(batch, c.conv_dim, c.d_conv, device=device, dtype=dtype),
            ssm=torch.zeros(batch, c.n_heads, c.head_dim, c.d_v, device=device, dtype=state_dtype(dtype)),
        )

    def step(self, x: torch.Tensor, cache: RecurrentCache, **context) -> torch.Tensor:
        c = self.config
        qkv, z, a, b = self._split(self.in_proj(x[:, 0]))
        qkv = ops.causal_conv1d_update(qkv, cache.conv, self.conv1d.weight[:, 0], self.conv1d.bias, "silu",
                                       backend="torch")
        q, k, v = self._heads(qkv)  # (B, H, K), (B, H, K), (B, H, V)
        g, beta = self._gates(a, b)
        o = ops.delta_rule_step(cache.ssm, q, k, v, g, beta)
        o = self.norm(o, z.unflatten(-1, (c.n_heads, c.d_v)))
        return self.out_proj(o.flatten(-2))[:, None]

    def cache_bytes(self, batch, seq_len, dtype=torch.bfloat16) -> dict[str, int]:
        c = self.config
        conv = batch * c.conv_dim * c.d_conv * dtype.itemsize
        return {"kv": 0, "state": conv + batch * c.n_heads * c.head_dim * c.d_v * state_dtype(dtype).itemsize}

    def flops_per_token(self, seq_len: int) -> int:
        """Projections, the short conv and the chunked delta rule (chunk T = min(chunk_size, seq_len)).

        Per token and head (K = head_dim, V = d_v): k.k^T and q.k^T scores 2TK each, the triangular solve
        for [beta V, beta G K] T(K + V), scores.U 2TV, and three state products (W S, Q S, K^T U) 2KV each.
        """
        c = self.config
        T, K, V = min(c.chunk_size, seq_len), c.head_dim, c.d_v
        rule = c.n_heads * (4 * T * K + T * (K + V) + 2 * T * V + 6 * K * V)
        return linear_flops(self.in_proj, self.out_proj) + 2 * c.conv_dim * c.d_conv + rule
