"""Thin adapters over the mamba-ssm (and causal-conv1d) CUDA kernels, imported on first use.

Signatures mirror the PyTorch ops in this package so `blocks.ops` can dispatch without reshaping. The mamba-ssm
calls are torch.library custom ops ("hybrids::..."): each has a fake (shapes and dtypes only) and the scans an
autograd formula that calls the kernels' own backward, so torch.compile traces around them instead of breaking its
graph at every layer. An op's outputs are contiguous, and each gradient has its input's dtype, as the fakes say.
Importing this module imports no kernel: `blocks.ops` imports it only for CUDA tensors with mamba_ssm present.
causal-conv1d's functions are called as they are (an autograd Function of its own; torch.compile breaks there);
without causal-conv1d the conv of channels-last input is ours in Triton (`blocks.ops.conv_triton`, custom ops).
Document ids (`blocks.ops.documents`) reach the kernels that take them as `seq_idx` (B, L) int32, one label per
document: the SSD's forward and backward and causal-conv1d's forward.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange, repeat
from torch import Tensor

from blocks.ops.backend import importable
from blocks.ops.conv import causal_conv1d_torch, causal_conv1d_update_torch
from blocks.ops.documents import positions, segments

SCAN_CHUNK = 2048  # selective_scan_cuda keeps one state per 2048 positions for its backward


def seq_idx(doc_ids: Tensor | None) -> Tensor | None:
    """The kernels' (B, L) int32 seq_idx: the canonical segment of each token."""
    return None if doc_ids is None else segments(doc_ids).to(torch.int32).contiguous()


def _out(t: Tensor) -> Tensor:
    return t.contiguous()


def _grads(grads, inputs) -> tuple[Tensor, ...]:
    """Each gradient contiguous in its input's dtype; an empty tensor for an input that is None."""
    like = next(t for t in inputs if t is not None)
    return tuple(like.new_empty(0) if t is None else _out(g.to(t.dtype)) for g, t in zip(grads, inputs, strict=True))


def _fake_grads(inputs) -> tuple[Tensor, ...]:
    like = next(t for t in inputs if t is not None)
    return tuple(like.new_empty(0) if t is None else t.new_empty(t.shape) for t in inputs)


# Mamba2: the chunked SSD (mamba_chunk_scan_combined's forward and backward).

@torch.library.custom_op("hybrids::ssd_fwd", mutates_args=())
def ssd_fwd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Tensor | None,
            z: Tensor | None, dt_bias: Tensor | None, initial_states: Tensor | None, seq_idx: Tensor | None,
            dt_softplus: bool, dt_min: float, dt_max: float) -> tuple[Tensor, Tensor, Tensor]:
    """x (b, l, h, p) -> out (b, l, h, p), out before the z gate (empty without z), final states (b, h, p, n) fp32.

    seq_idx: (b, l) int32 document labels or None; the state restarts where the label changes."""
    from mamba_ssm.ops.triton.ssd_combined import _mamba_chunk_scan_combined_fwd

    out, out_x, _, _, _, final = _mamba_chunk_scan_combined_fwd(
        x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states, seq_idx=seq_idx,
        dt_softplus=dt_softplus, dt_limit=(dt_min, dt_max))
    return _out(out), _out(out_x) if z is not None else x.new_empty(0), _out(final)


@ssd_fwd.register_fake
def _(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_min, dt_max):
    b, _, h, p = x.shape
    gated = x.new_empty(x.shape) if z is not None else x.new_empty(0)
    return x.new_empty(x.shape), gated, x.new_empty((b, h, p, B.shape[-1]), dtype=torch.float32)


@torch.library.custom_op("hybrids::ssd_bwd", mutates_args=())
def ssd_bwd(dout: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, out: Tensor, chunk_size: int,
            D: Tensor | None, z: Tensor | None, dt_bias: Tensor | None, initial_states: Tensor | None,
            dfinal_states: Tensor | None, seq_idx: Tensor | None, dt_softplus: bool, dt_min: float,
            dt_max: float) -> list[Tensor]:
    """Gradients of x, dt, A, B, C, D, z, dt_bias, initial_states (empty for those that are None)."""
    from mamba_ssm.ops.triton.ssd_combined import _mamba_chunk_scan_combined_bwd

    grads = _mamba_chunk_scan_combined_bwd(
        dout, x, dt, A, B, C, out, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
        dfinal_states=dfinal_states, seq_idx=seq_idx, dt_softplus=dt_softplus, dt_limit=(dt_min, dt_max))
    return list(_grads(grads, (x, dt, A, B, C, D, z, dt_bias, initial_states)))


@ssd_bwd.register_fake
def _(dout, x, dt, A, B, C, out, chunk_size, D, z, dt_bias, initial_states, dfinal_states, seq_idx, dt_softplus,
      dt_min, dt_max):
    return list(_fake_grads((x, dt, A, B, C, D, z, dt_bias, initial_states)))


def _ssd_setup(ctx, inputs, output):
    x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_min, dt_max = inputs
    out, out_x, _ = output
    # the backward reads the output before the z gate, as mamba-ssm's MambaChunkScanCombinedFn saves it
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, out if z is None else out_x)
    ctx.options = (chunk_size, dt_softplus, dt_min, dt_max)


def _ssd_backward(ctx, dout, _dout_x, dfinal):
    x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, out = ctx.saved_tensors
    chunk_size, dt_softplus, dt_min, dt_max = ctx.options
    grads = ssd_bwd(dout, x, dt, A, B, C, out, chunk_size, D, z, dt_bias, initial_states, dfinal, seq_idx,
                    dt_softplus, dt_min, dt_max)
    dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit = (
        g if t is not None else None for g, t in zip(grads, (x, dt, A, B, C, D, z, dt_bias, initial_states),
                                                    strict=True))
    return dx, ddt, dA, dB, dC, None, dD, dz, ddt_bias, dinit, None, None, None, None


ssd_fwd.register_autograd(_ssd_backward, setup_context=_ssd_setup)


def ssd(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, initial_states, return_final_states,
        dt_limit, doc_ids=None):
    out, _, final = ssd_fwd(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx(doc_ids),
                            dt_softplus, float(dt_limit[0]), float(dt_limit[1]))
    return (out, final) if return_final_states else out


# Mamba1: the selective scan (selective_scan_cuda's forward and backward).

@torch.library.custom_op("hybrids::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                       z: Tensor | None, delta_bias: Tensor | None,
                       delta_softplus: bool) -> tuple[Tensor, Tensor, Tensor]:
    """u, delta (b, d, l), B and C (b, g, n, l) -> out (b, d, l) before the z gate, states (b, d, chunks, 2n) in A's
    dtype (one per SCAN_CHUNK positions; [..., -1, 1::2] is the final state), gated out (empty without z)."""
    import selective_scan_cuda

    u, delta, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (u, delta, B, C))
    out, states, *rest = selective_scan_cuda.fwd(u, delta, A, B, C, D.contiguous() if D is not None else None,
                                                 z.contiguous() if z is not None else None, delta_bias,
                                                 delta_softplus)
    return _out(out), _out(states), _out(rest[0]) if z is not None else u.new_empty(0)


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    b, d, length = u.shape
    states = u.new_empty((b, d, math.ceil(length / SCAN_CHUNK), 2 * A.shape[-1]), dtype=A.dtype)
    return delta.new_empty(u.shape), states, delta.new_empty(u.shape) if z is not None else u.new_empty(0)


@torch.library.custom_op("hybrids::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                       z: Tensor | None, delta_bias: Tensor | None, states: Tensor, out: Tensor | None,
                       delta_softplus: bool) -> list[Tensor]:
    """Gradients of u, delta, A, B, C, D, z, delta_bias (empty for those that are None)."""
    import selective_scan_cuda

    u, delta, B, C, dout = (t if t.stride(-1) == 1 else t.contiguous() for t in (u, delta, B, C, dout))
    du, ddelta, dA, dB, dC, dD, ddelta_bias, *rest = selective_scan_cuda.bwd(
        u, delta, A, B, C, D.contiguous() if D is not None else None, z.contiguous() if z is not None else None,
        delta_bias, dout, states, out, None, delta_softplus, False)
    dz = rest[0] if z is not None else None
    return list(_grads((du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), (u, delta, A, B, C, D, z, delta_bias)))


@selective_scan_bwd.register_fake
def _(dout, u, delta, A, B, C, D, z, delta_bias, states, out, delta_softplus):
    return list(_fake_grads((u, delta, A, B, C, D, z, delta_bias)))


def _scan_setup(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus = inputs
    out, states, _ = output
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states, out if z is not None else None)
    ctx.delta_softplus = delta_softplus


def _scan_backward(ctx, _dout, _dstates, dout_z):
    u, delta, A, B, C, D, z, delta_bias, states, out = ctx.saved_tensors
    dout = dout_z if z is not None else _dout  # the gated output is the one used when there is a z
    grads = selective_scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, states, out, ctx.delta_softplus)
    return (*(g if t is not None else None for g, t in zip(grads, (u, delta, A, B, C, D, z, delta_bias),
                                                          strict=True)), None)


selective_scan_fwd.register_autograd(_scan_backward, setup_context=_scan_setup)


def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_final_state):
    """As mamba-ssm's selective_scan_fn; the final state carries no gradient (training never needs it)."""
    if B.dim() == 3:
        B, C = B[:, None], C[:, None]
    out, states, gated = selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    y = gated if z is not None else out
    return (y, states[:, :, -1, 1::2].detach()) if return_final_state else y


# One-token steps (Triton selective_state_update): the state is updated in place.

@torch.library.custom_op("hybrids::state_update", mutates_args=("state",))
def state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                 z: Tensor | None, dt_bias: Tensor | None, dt_softplus: bool) -> Tensor:
    """mamba-ssm's selective_state_update: y of x's shape; `state` advanced one step."""
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update as kernel

    # mamba-ssm 2.3.2's launch reads D's and dt_bias's strides unconditionally (None raises a TypeError there):
    # zeros are the same step
    zeros = torch.zeros(x.shape[1:], device=x.device, dtype=torch.float32)
    D = zeros if D is None else D
    dt_bias = zeros if dt_bias is None else dt_bias
    return _out(kernel(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus))


@state_update.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    return x.new_empty(x.shape)


def selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """Mamba1 step with G groups: run the multi-head Triton kernel on a (B, G, D/G, N) view of the state."""
    groups = B.shape[1] if B.dim() == 3 else 1
    B, C = (t.view(t.shape[0], groups, -1) for t in (B, C))
    split = "b (g k) -> b g k"
    y = state_update(
        state.view(state.shape[0], groups, -1, state.shape[-1]),
        rearrange(x, split, g=groups), rearrange(dt, split, g=groups),
        rearrange(A, "(g k) n -> g k n", g=groups), B, C,
        rearrange(D, "(g k) -> g k", g=groups) if D is not None else None,
        rearrange(z, split, g=groups) if z is not None else None,
        rearrange(dt_bias, "(g k) -> g k", g=groups) if dt_bias is not None else None,
        dt_softplus,
    )
    return rearrange(y, "b g k -> b (g k)")


def ssd_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """Mamba2 step: per-head dt, A and D tied across headdim and d_state with zero strides."""
    headdim, d_state = state.shape[2], state.shape[3]
    if dt_bias is None:  # the kernel's multi-head path reads dt_bias unconditionally
        dt_bias = dt.new_zeros(dt.shape[1], dtype=torch.float32)
    return state_update(
        state, x, repeat(dt, "b h -> b h p", p=headdim),
        repeat(A, "h -> h p n", p=headdim, n=d_state), B, C,
        repeat(D, "h -> h p", p=headdim) if D is not None and D.dim() == 1 else D,
        z, repeat(dt_bias, "h -> h p", p=headdim), dt_softplus,
    )


def causal_conv1d(x, weight, bias, activation, doc_ids=None):
    """causal-conv1d's kernel when installed, else ours in Triton (`conv_triton`) for channels-last x."""
    if not importable("causal_conv1d"):
        if x.stride(1) != 1:
            return causal_conv1d_torch(x, weight, bias, activation, doc_ids)
        from blocks.ops import conv_triton

        return conv_triton.causal_conv1d(x, weight, bias, activation, positions(doc_ids) if doc_ids is not None
                                         else None)
    from causal_conv1d import causal_conv1d_fn

    if doc_ids is not None and x.stride(1) != 1:  # the kernel reads seq_idx with channel-last x only
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    return causal_conv1d_fn(x, weight, bias, seq_idx=seq_idx(doc_ids), activation=activation)


def causal_conv1d_update(x, conv_state, weight, bias, activation):
    if not importable("causal_conv1d"):
        return causal_conv1d_update_torch(x, conv_state, weight, bias, activation)
    from causal_conv1d import causal_conv1d_update as kernel

    return kernel(x, conv_state, weight, bias, activation=activation)
