"""Numeric ops with a PyTorch path everywhere and the mamba-ssm kernels on CUDA when importable.

Each public op takes `backend` ("auto" | "torch" | "mamba_ssm", see `blocks.ops.backend`; the gated delta
rule takes "auto" | "torch" | "fla", see `blocks.ops.fla_kernels`). The pure-PyTorch implementations and
their sequential references live in the op modules. The sequence ops take `doc_ids` (B, L) and reset at
document starts (`blocks.ops.documents`); a kernel that cannot (Mamba1's selective_scan_fn, fla's gated delta
rule) leaves that call to the PyTorch path, with one warning per process.
"""

from __future__ import annotations

from blocks.ops import backend as _backend
from blocks.ops import fla_kernels as _fla
from blocks.ops.conv import causal_conv1d_torch, causal_conv1d_update_torch, conv_state_from
from blocks.ops.delta_rule import delta_rule_chunked, delta_rule_ref, delta_rule_step
from blocks.ops.scan import linear_scan, linear_scan_ref
from blocks.ops.selective_scan import selective_scan_ref, selective_scan_torch
from blocks.ops.selective_scan import selective_state_update as _selective_state_update_torch
from blocks.ops.ssd import ssd_chunked, ssd_ref
from blocks.ops.ssd import ssd_state_update as _ssd_state_update_torch

# The chunked SSD's cost on CPU grows with the chunk (T x T blocks); the result does not depend on it.
TORCH_MAX_CHUNK = 64


def _kernels(backend: str, x):
    if _backend.resolve(backend, x.device) != "mamba_ssm":
        return None
    from blocks.ops import kernels

    return kernels


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_final_state=False, backend="auto", doc_ids=None):
    """Mamba1 selective scan; see `selective_scan_torch` for shapes."""
    k = _kernels(backend, u)
    if k is not None and doc_ids is not None:
        _backend.warn_no_boundaries("mamba_ssm's selective_scan_fn (Mamba1)")
    elif k is not None:
        return k.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_final_state)
    return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                return_final_state=return_final_state, doc_ids=doc_ids)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           backend="auto"):
    """One Mamba1 step, state updated in place; see `selective_scan.selective_state_update`."""
    k = _kernels(backend, x)
    fn = k.selective_state_update if k is not None else _selective_state_update_torch
    return fn(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


def ssd(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
        return_final_states=False, dt_limit=(0.0, float("inf")), backend="auto", doc_ids=None):
    """Mamba2 SSD scan; see `ssd_chunked` for shapes."""
    k = _kernels(backend, x)
    if k is not None:
        return k.ssd(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, None, return_final_states,
                     dt_limit, doc_ids)
    return ssd_chunked(x, dt, A, B, C, min(chunk_size, TORCH_MAX_CHUNK), D, z, dt_bias, dt_softplus,
                       return_final_states=return_final_states, dt_limit=dt_limit, doc_ids=doc_ids)


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                     backend="auto"):
    """One Mamba2 step, state updated in place; see `ssd.ssd_state_update`."""
    k = _kernels(backend, x)
    fn = k.ssd_state_update if k is not None else _ssd_state_update_torch
    return fn(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


def causal_conv1d(x, weight, bias=None, activation=None, backend="auto", doc_ids=None):
    """Causal depthwise conv; x: (B, D, L), weight: (D, K), doc_ids: (B, L) or None."""
    k = _kernels(backend, x)
    fn = k.causal_conv1d if k is not None else causal_conv1d_torch
    return fn(x, weight, bias, activation, doc_ids)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, backend="auto"):
    """One conv step; x: (B, D), conv_state: (B, D, K) updated in place."""
    k = _kernels(backend, x)
    fn = k.causal_conv1d_update if k is not None else causal_conv1d_update_torch
    return fn(x, conv_state, weight, bias, activation)


def gated_delta_rule(q, k, v, g, beta, chunk_size=64, scale=None, initial_state=None, return_final_state=False,
                     backend="auto", doc_ids=None):
    """Gated DeltaNet's delta rule (fla's kernel on CUDA when it can serve); see `delta_rule_chunked`."""
    if _fla.resolve(backend, v.device) == "fla":
        if doc_ids is None:
            return _fla.chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, return_final_state)
        _backend.warn_no_boundaries("flash-linear-attention's chunk_gated_delta_rule")
    return delta_rule_chunked(q, k, v, g, beta, chunk_size, scale, initial_state, return_final_state, doc_ids)


__all__ = [
    "causal_conv1d",
    "causal_conv1d_update",
    "conv_state_from",
    "delta_rule_chunked",
    "delta_rule_ref",
    "delta_rule_step",
    "gated_delta_rule",
    "linear_scan",
    "linear_scan_ref",
    "selective_scan",
    "selective_scan_ref",
    "selective_scan_torch",
    "selective_state_update",
    "ssd",
    "ssd_chunked",
    "ssd_ref",
    "ssd_state_update",
]
