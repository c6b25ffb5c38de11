"""Mamba1 selective scan: parallel form, sequential reference and single-step form.

Shapes follow mamba_ssm's `selective_scan_fn` so the two backends are interchangeable:
u, delta, z: (B, D, L); A: (D, N); B, C: (B, G, N, L) with D split into G groups (G = 1 for plain
Mamba, G = n_mamba_heads for Zamba's multi-head Mamba); D: (D,); delta_bias: (D,).
Everything is computed in fp32 (as the kernels do) and returned in u's dtype. With `doc_ids` (B, L) the state
resets at every document start (`blocks.ops.documents`): the decay into a start is zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from blocks.ops.documents import starts
from blocks.ops.scan import linear_scan, linear_scan_ref


def _discretize(u, delta, A, B, delta_bias, delta_softplus, doc_ids=None):
    """Per-step decay exp(delta*A) (zero at document starts) and input delta*B*u, both (B, L, G, D/G, N),
    fp32 or wider."""
    dtype = torch.promote_types(u.dtype, torch.float32)
    groups = B.shape[1]
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    delta = rearrange(delta, "b (g k) l -> b l g k", g=groups)
    u = rearrange(u.to(dtype), "b (g k) l -> b l g k", g=groups)
    A = rearrange(A.to(dtype), "(g k) n -> g k n", g=groups)
    B = rearrange(B.to(dtype), "b g n l -> b l g n")
    decay = torch.exp(delta[..., None] * A)  # (B, L, G, K, N)
    if doc_ids is not None:
        decay = decay.masked_fill(starts(doc_ids)[:, :, None, None, None], 0)
    inputs = (delta * u)[..., None] * B[:, :, :, None, :]  # (B, L, G, K, N)
    return decay, inputs


def _readout(h, u, C, D, z, out_dtype):
    """y = C.h + D*u, gated by silu(z); h: (B, L, G, K, N) -> (B, D, L)."""
    C = rearrange(C.to(h.dtype), "b g n l -> b l g n")
    y = torch.einsum("blgkn,blgn->blgk", h, C)
    y = rearrange(y, "b l g k -> b (g k) l")
    if D is not None:
        y = y + D.to(h.dtype)[:, None] * u.to(h.dtype)
    if z is not None:
        y = y * F.silu(z.to(h.dtype))
    return y.to(out_dtype)


def _as_grouped(B: torch.Tensor) -> torch.Tensor:
    return B[:, None] if B.dim() == 3 else B


def _run(scan, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state, doc_ids):
    B, C = _as_grouped(B), _as_grouped(C)
    decay, inputs = _discretize(u, delta, A, B, delta_bias, delta_softplus, doc_ids)
    h0 = None
    if initial_state is not None:
        h0 = rearrange(initial_state, "b (g k) n -> b g k n", g=B.shape[1])
    h = scan(decay, inputs, h0)
    y = _readout(h, u, C, D, z, u.dtype)
    if not return_final_state:
        return y
    return y, rearrange(h[:, -1], "b g k n -> b (g k) n")


def selective_scan_torch(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    initial_state=None, return_final_state=False, doc_ids=None,
):
    """Selective scan by a parallel (Blelloch) scan over time; runs on CPU and GPU.

    Args:
        u, delta: (B, D, L). A: (D, N). B, C: (B, G, N, L) or (B, N, L). D: (D,) or None.
        z: (B, D, L) gate or None. delta_bias: (D,) or None. delta_softplus: apply softplus to delta.
        initial_state: (B, D, N) or None; it continues the first document. return_final_state: also return the
        last state. doc_ids: (B, L) document ids or None; the state resets at every document start.
    Returns:
        y: (B, D, L) in u's dtype, and the final state (B, D, N) in fp32 if requested.
    """
    return _run(linear_scan, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                initial_state, return_final_state, doc_ids)


def selective_scan_ref(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    initial_state=None, return_final_state=False, doc_ids=None,
):
    """Sequential reference of `selective_scan_torch` (loop over time; tests and benchmarks only)."""
    return _run(linear_scan_ref, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                initial_state, return_final_state, doc_ids)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One recurrent step; updates `state` in place.

    Args:
        state: (B, D, N) fp32. x, dt, z: (B, D). A: (D, N). B, C: (B, G, N) or (B, N). D, dt_bias: (D,).
    Returns:
        y: (B, D) in x's dtype.
    """
    u, delta = x[..., None], dt[..., None]
    B = (B if B.dim() == 3 else B[:, None])[..., None]  # (B, G, N, 1)
    C = (C if C.dim() == 3 else C[:, None])[..., None]
    zz = z[..., None] if z is not None else None
    y, new_state = selective_scan_torch(u, delta, A, B, C, D, zz, dt_bias, dt_softplus,
                                        initial_state=state, return_final_state=True)
    state.copy_(new_state)
    return y[..., 0]
