"""Mamba2 state-space duality (SSD): chunked matmul form, sequential reference and single-step form.

Shapes follow mamba_ssm's `mamba_chunk_scan_combined`: x: (B, L, H, P); dt: (B, L, H); A: (H,);
B, C: (B, L, G, N) with the H heads split into G groups; D: (H,) or (H, P); z: (B, L, H, P).
Within a chunk the output is a masked (T x T) matrix product; chunk states are passed on by a
product with the (chunks x chunks) decay matrix. Decays enter only as exp of non-positive sums
(`segsum`), so strong decay cannot overflow. Computed in fp32 and returned in x's dtype.

With `doc_ids` (B, L) the state resets at every document start (`blocks.ops.documents`): every decay factor
that spans a start (within a chunk, to a chunk's end, from chunk to chunk, from the carried state to a
position) is zeroed, as mamba-ssm's kernels do with `seq_idx`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from blocks.ops.documents import chunk_labels, pad_segments, segments, starts


def segsum(x: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T) with [i, j] = sum(x[j+1 : i+1]) for j <= i and -inf above the diagonal.

    Summing masked copies (not differencing a cumsum) keeps long chunks with strong decay exact.
    """
    T = x.shape[-1]
    x = repeat(x, "... i -> ... i j", j=T)  # [i, j] = x[i]; keep i > j, then sum over i
    strict = torch.ones(T, T, dtype=torch.bool, device=x.device).tril(-1)
    x = x.masked_fill(~strict, 0).cumsum(dim=-2)
    return x.masked_fill(~strict.logical_or(torch.eye(T, dtype=torch.bool, device=x.device)), float("-inf"))


def _prepare(x, dt, A, B, C, dt_bias, dt_softplus, dt_limit):
    dtype = torch.promote_types(x.dtype, torch.float32)
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_limit != (0.0, float("inf")):
        dt = dt.clamp(*dt_limit)
    return x.to(dtype), dt, A.to(dtype), B.to(dtype), C.to(dtype)


def _per_head(t, heads):
    """(B, L, G, N) -> (B, L, H, N): each group's B or C for each of its heads."""
    return repeat(t, "b l g n -> b l (g r) n", r=heads // t.shape[2])


def _finish(y, x, D, z, out_dtype):
    if D is not None:
        D = D.to(y.dtype)
        y = y + x * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


def ssd_chunked(
    x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
    initial_states=None, return_final_states=False, dt_limit=(0.0, float("inf")), doc_ids=None,
):
    """SSD by chunks (matmul form); runs on CPU and GPU; any length (the last chunk is padded).

    Args:
        x: (B, L, H, P). dt: (B, L, H). A: (H,). B, C: (B, L, G, N). chunk_size: T.
        D: (H,) or (H, P). z: (B, L, H, P) gate or None. dt_bias: (H,). dt_softplus: softplus on dt.
        initial_states: (B, H, P, N) or None; they continue the first document. dt_limit: clamp for dt after
        softplus. doc_ids: (B, L) document ids or None; the state resets at every document start.
    Returns:
        y: (B, L, H, P) in x's dtype, and the final states (B, H, P, N) in fp32 (the last document's) if requested.
    """
    out_dtype, length = x.dtype, x.shape[1]
    x0, dt, A, B, C = _prepare(x, dt, A, B, C, dt_bias, dt_softplus, dt_limit)
    groups = B.shape[2]  # B and C stay per group: C.B and the contractions with B and C run once per group
    pad = -length % chunk_size
    # Padded steps have dt = 0: decay 1 and no input, so the final state is unchanged.
    x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x0, dt, B, C))
    x = rearrange(x, "b (c t) (g r) p -> b c t g r p", t=chunk_size, g=groups)
    B, C = (rearrange(t, "b (c t) g n -> b c t g n", t=chunk_size) for t in (B, C))
    dA = rearrange(dt * A, "b (c t) h -> b h c t", t=chunk_size)
    dt = rearrange(dt, "b (c t) (g r) -> b c t g r", t=chunk_size, g=groups)
    xdt = x * dt[..., None]  # (B, c, T, G, R, P)
    dA_cs = dA.cumsum(dim=-1)  # (B, H, c, T)
    masks = None if doc_ids is None else _document_masks(doc_ids, chunk_size, pad)

    # 1. Within each chunk: y_i = sum_{j<=i} C_i.B_j exp(sum dA[j+1..i]) dt_j x_j.
    decay_in = torch.exp(segsum(dA))  # (B, H, c, T, T)
    if masks is not None:
        decay_in = decay_in * masks["within"]
    scores = rearrange(decay_in, "b (g r) c i j -> b g r c i j", g=groups) * torch.einsum(
        "bcign,bcjgn->bgcij", C, B)[:, :, None]
    y = torch.einsum("bgrcij,bcjgrp->bcigrp", scores, xdt)

    # 2. State at each chunk's end from its own inputs.
    decay_to_end = torch.exp(dA_cs[..., -1:] - dA_cs)  # (B, H, c, T), exponents <= 0
    if masks is not None:
        decay_to_end = decay_to_end * masks["to_end"]
    decay_to_end = rearrange(decay_to_end, "b (g r) c t -> b c t g r", g=groups)
    states = torch.einsum("bcjgn,bcjgrp->bcgrpn", B, xdt * decay_to_end[..., None])
    states = rearrange(states, "b c g r p n -> b c (g r) p n")

    # 3. Pass states across chunks: a (c+1 x c+1) decay matrix over chunk totals.
    if initial_states is None:
        initial_states = torch.zeros_like(states[:, :1])
    else:
        initial_states = initial_states.to(states.dtype)[:, None]
    states = torch.cat([initial_states, states], dim=1)  # (B, c+1, H, P, N)
    decay_chunks = torch.exp(segsum(F.pad(dA_cs[..., -1], (1, 0))))  # (B, H, c+1, c+1)
    if masks is not None:
        decay_chunks = decay_chunks * masks["chunks"]
    states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunks, states)
    carried, final = states[:, :-1], states[:, -1]

    # 4. Carried state read out at every position of the next chunk.
    decay_from_start = torch.exp(dA_cs) if masks is None else torch.exp(dA_cs) * masks["from_start"]
    carried = rearrange(carried, "b c (g r) p n -> b c g r p n", g=groups)
    readout = torch.einsum("bcign,bcgrpn->bcigrp", C, carried)
    y = y + readout * rearrange(decay_from_start, "b (g r) c i -> b c i g r", g=groups)[..., None]
    y = rearrange(y, "b c t g r p -> b (c t) (g r) p")[:, :length]
    y = _finish(y, x0, D, z, out_dtype)
    return (y, final) if return_final_states else y


def _document_masks(doc_ids: torch.Tensor, chunk_size: int, pad: int) -> dict[str, torch.Tensor]:
    """Bool masks that keep the decays within one document, shaped to multiply those of `ssd_chunked`:
    within (B, 1, c, T, T), to_end and from_start (B, 1, c, T), chunks (B, 1, c+1, c+1)."""
    seg = rearrange(pad_segments(segments(doc_ids), pad), "b (c t) -> b c t", t=chunk_size)
    entering, ending = chunk_labels(seg)
    ends = torch.cat([entering[:, :1], ending], dim=1)  # (B, c+1): the document of each state in step 3
    masks = {"within": seg[..., :, None] == seg[..., None, :], "to_end": seg == ending[..., None],
             "chunks": ends[:, :, None] == ends[:, None, :], "from_start": seg == entering[..., None]}
    return {k: m[:, None] for k, m in masks.items()}


def ssd_ref(
    x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
    initial_states=None, return_final_states=False, dt_limit=(0.0, float("inf")), doc_ids=None,
):
    """Sequential reference of `ssd_chunked` (a loop over time; tests and benchmarks only)."""
    out_dtype = x.dtype
    x, dt, A, B, C = _prepare(x, dt, A, B, C, dt_bias, dt_softplus, dt_limit)
    batch, length, heads, headdim = x.shape
    B, C = _per_head(B, heads), _per_head(C, heads)
    h = x.new_zeros(batch, heads, headdim, B.shape[-1]) if initial_states is None else initial_states.to(x.dtype)
    keep = None if doc_ids is None else ~starts(doc_ids)  # (B, L): False where the state resets
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]  # (B, H, 1, 1)
        if keep is not None:
            decay = decay * keep[:, t, None, None, None]
        h = decay * h + torch.einsum("bh,bhp,bhn->bhpn", dt[:, t], x[:, t], B[:, t])
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    y = _finish(torch.stack(ys, dim=1), x, D, z, out_dtype)
    return (y, h) if return_final_states else y


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                     dt_limit=(0.0, float("inf"))):
    """One recurrent step; updates `state` in place.

    Args:
        state: (B, H, P, N) fp32. x, z: (B, H, P). dt: (B, H). A: (H,). B, C: (B, G, N).
        D: (H,) or (H, P). dt_bias: (H,).
    Returns:
        y: (B, H, P) in x's dtype.
    """
    y, new_state = ssd_ref(x[:, None], dt[:, None], A, B[:, None], C[:, None], D,
                           z[:, None] if z is not None else None, dt_bias, dt_softplus,
                           initial_states=state, return_final_states=True, dt_limit=dt_limit)
    state.copy_(new_state)
    return y[:, 0]
