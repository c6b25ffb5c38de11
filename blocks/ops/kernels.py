"""Thin adapters over the mamba-ssm (and causal-conv1d) CUDA kernels, imported on first use.

Signatures mirror the PyTorch ops in this package so `blocks.ops` can dispatch without reshaping. Document ids
(`blocks.ops.documents`) reach the kernels that take them as `seq_idx` (int32, one label per document).
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat

from blocks.ops.backend import importable
from blocks.ops.conv import causal_conv1d_torch, causal_conv1d_update_torch
from blocks.ops.documents import segments


def seq_idx(doc_ids: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels' (B, L) int32 seq_idx: the canonical segment of each token."""
    return None if doc_ids is None else segments(doc_ids).to(torch.int32).contiguous()


def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_final_state):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return selective_scan_fn(u, delta, A, B.contiguous(), C.contiguous(), D, z, delta_bias,
                             delta_softplus, return_last_state=return_final_state)


def selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """Mamba1 step with G groups: run the multi-head Triton kernel on a (B, G, D/G, N) view of the state."""
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update as kernel

    groups = B.shape[1] if B.dim() == 3 else 1
    B, C = (t.view(t.shape[0], groups, -1) for t in (B, C))
    split = "b (g k) -> b g k"
    y = kernel(
        state.view(state.shape[0], groups, -1, state.shape[-1]),
        rearrange(x, split, g=groups), rearrange(dt, split, g=groups),
        rearrange(A, "(g k) n -> g k n", g=groups), B, C,
        D=rearrange(D, "(g k) -> g k", g=groups) if D is not None else None,
        z=rearrange(z, split, g=groups) if z is not None else None,
        dt_bias=rearrange(dt_bias, "(g k) -> g k", g=groups) if dt_bias is not None else None,
        dt_softplus=dt_softplus,
    )
    return rearrange(y, "b g k -> b (g k)")


def ssd(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, initial_states, return_final_states,
        dt_limit, doc_ids=None):
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    return mamba_chunk_scan_combined(
        x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
        seq_idx=seq_idx(doc_ids), dt_softplus=dt_softplus, dt_limit=dt_limit,
        return_final_states=return_final_states,
    )


def ssd_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """Mamba2 step: per-head dt, A and D tied across headdim and d_state with zero strides."""
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update as kernel

    headdim, d_state = state.shape[2], state.shape[3]
    if dt_bias is None:  # the kernel's multi-head path reads dt_bias unconditionally
        dt_bias = dt.new_zeros(dt.shape[1], dtype=torch.float32)
    return kernel(
        state, x, repeat(dt, "b h -> b h p", p=headdim),
        repeat(A, "h -> h p n", p=headdim, n=d_state), B, C,
        D=repeat(D, "h -> h p", p=headdim) if D is not None and D.dim() == 1 else D,
        z=z, dt_bias=repeat(dt_bias, "h -> h p", p=headdim),
        dt_softplus=dt_softplus,
    )


def causal_conv1d(x, weight, bias, activation, doc_ids=None):
    if not importable("causal_conv1d"):
        return causal_conv1d_torch(x, weight, bias, activation, doc_ids)
    from causal_conv1d import causal_conv1d_fn

    if doc_ids is not None and x.stride(1) != 1:  # the kernel reads seq_idx with channel-last x only
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    return causal_conv1d_fn(x, weight, bias, seq_idx=seq_idx(doc_ids), activation=activation)


def causal_conv1d_update(x, conv_state, weight, bias, activation):
    if not importable("causal_conv1d"):
        return causal_conv1d_update_torch(x, conv_state, weight, bias, activation)
    from causal_conv1d import causal_conv1d_update as kernel

    return kernel(x, conv_state, weight, bias, activation=activation)
