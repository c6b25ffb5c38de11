"""The Mamba2 mixer as transformers' Mamba2-based hybrids store it (Zamba2, Bamba, Falcon-H1, NemotronH,
GraniteMoeHybrid): in_proj rows [z, xBC, dt], a depthwise conv over xBC, per-head dt_bias / A_log / D, a gated
grouped RMSNorm (`norm`) and out_proj, all named as HybridLM's Mamba2 names them.
"""

from __future__ import annotations

import math

import torch

from blocks.mamba2 import Mamba2, Mamba2Config
from hybrids.hf.interop import WeightMap, require


def mamba2_options(family: str, *, d_model: int, n_heads: int, headdim: int, ngroups: int, d_state: int,
                   d_conv: int, chunk_size: int, conv_bias: bool, bias: bool, norm_eps: float, dt_limit,
                   activation: str, gate_norm: str = "gated") -> dict:
    """blocks.mamba2 options of an HF Mamba2 mixer with n_heads * headdim inner channels.

    Raises:
        ConfigError: a conv activation other than SiLU (named with the family).
    """
    require(activation in ("silu", "swish"), f"{family}'s Mamba2 conv activation must be 'silu', got {activation!r}")
    d_inner = n_heads * headdim
    width = {"expand": d_inner // d_model} if d_inner % d_model == 0 else {"d_ssm": d_inner}
    lo, hi = tuple(dt_limit) if dt_limit is not None else (0.0, math.inf)
    return dict(d_state=d_state, d_conv=d_conv, headdim=headdim, ngroups=ngroups, conv_bias=bool(conv_bias),
                bias=bool(bias), norm_eps=norm_eps, dt_limit=(float(lo), float(hi)), gate_norm=gate_norm,
                chunk_size=chunk_size if chunk_size > 0 and chunk_size & (chunk_size - 1) == 0 else 256, **width)


def bamba_style_mamba2(family: str, c) -> dict:
    """blocks.mamba2 options of an HF config that names its Mamba2 mixer as Bamba does (mamba_n_heads, mamba_d_head,
    mamba_n_groups, ...): Bamba and GraniteMoeHybrid."""
    return mamba2_options(family, d_model=c.hidden_size, n_heads=c.mamba_n_heads, headdim=c.mamba_d_head,
                          ngroups=c.mamba_n_groups, d_state=c.mamba_d_state, d_conv=c.mamba_d_conv,
                          chunk_size=c.mamba_chunk_size, conv_bias=c.mamba_conv_bias, bias=c.mamba_proj_bias,
                          norm_eps=c.rms_norm_eps, dt_limit=c.time_step_limit, activation=c.hidden_act)


def mamba2_weights(w: WeightMap, m: Mamba2, p: str, rows: float | torch.Tensor = 1.0, in_scale: float = 1.0,
                   out_scale: float = 1.0) -> None:
    """The mixer's parameters under HF prefix p. HF multipliers folded in: rows on in_proj's output (per row),
    in_scale on the mixer's input (into in_proj) and out_scale on its output (into out_proj)."""
    w.scaled_params(m.in_proj, p + "in_proj.", rows, in_scale)
    w.params(m.conv1d, p + "conv1d.")
    if any(True for _ in m.norm.parameters()):
        w.params(m.norm, p + "norm.")
    w.scaled_params(m.out_proj, p + "out_proj.", out_scale)
    for name in ("dt_bias", "A_log", "D"):
        w.same(getattr(m, name), p + name)


def hf_mamba2(c: Mamba2Config) -> dict:
    """The mixer's fields under the names Bamba, Falcon-H1 and GraniteMoeHybrid configs give them."""
    return dict(mamba_n_heads=c.n_heads, mamba_d_head=c.headdim, mamba_n_groups=c.ngroups, mamba_d_state=c.d_state,
                mamba_d_conv=c.d_conv, mamba_chunk_size=c.chunk_size, mamba_conv_bias=c.conv_bias,
                mamba_proj_bias=c.bias, time_step_limit=tuple(c.dt_limit))
