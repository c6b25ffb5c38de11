"""Gated delta rule (Gated DeltaNet): chunked WY form, sequential reference and single-step form.

Per head, with the state kept as S (d_k, d_v) (flash-linear-attention's layout, the transpose of the paper's):

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,    o_t = S_t^T (scale * q_t)

Shapes follow flash-linear-attention's `chunk_gated_delta_rule`: q, k: (B, L, H, K); v: (B, L, H, V);
g = log(alpha): (B, L, H), <= 0; beta: (B, L, H) in [0, 1]; states (B, H, K, V). Computed in fp32 (or
wider) and returned in v's dtype; states in fp32 (or wider).

Chunked form. Writing S_t = alpha_t S_{t-1} + k_t u_t^T with u_t = beta_t (v_t - alpha_t S_{t-1}^T k_t), the
u of one chunk solve a unit lower-triangular system (the UT transform): with G_i = exp(sum of g over the chunk
up to i) and S_0 the state entering the chunk,

    (I + A) U = beta V - (beta G K) S_0,   A[i, j] = beta_i (G_i / G_j) k_i . k_j  for j < i,

so U = T (beta V) - T (beta G K) S_0 with T = (I + A)^-1, found by one triangular solve per chunk for all
chunks at once. Outputs and the next state are then matrix products; only S_0 passes from chunk to chunk.

With `doc_ids` (B, L) the state resets at every document start (`blocks.ops.documents`): alpha is zero there,
so every decay factor that spans a start (G_i / G_j within a chunk, G_i from the entering state S_0, to the
chunk's end, across the chunk) is zeroed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from blocks.ops.documents import chunk_labels, pad_segments, segments, starts
from blocks.ops.ssd import segsum


def _prepare(q, k, v, g, beta, scale):
    dtype = torch.promote_types(v.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return (q.to(dtype) * scale, k.to(dtype), v.to(dtype), g.to(dtype), beta.to(dtype))


def delta_rule_chunked(q, k, v, g, beta, chunk_size=64, scale=None, initial_state=None, return_final_state=False,
                       doc_ids=None):
    """Gated delta rule by chunks (WY / UT-transform form); runs on CPU and GPU; any length.

    Args:
        q, k: (B, L, H, K); k is expected L2-normalised (the recurrence is stable for beta ||k||^2 <= 2).
        v: (B, L, H, V). g: (B, L, H) log decays (<= 0). beta: (B, L, H) in [0, 1].
        chunk_size: T; the result does not depend on it. scale: on q; None: K ** -0.5.
        initial_state: (B, H, K, V) or None (zeros); it continues the first document. return_final_state: also
        return the last state (the last document's). doc_ids: (B, L) document ids or None; the state resets at
        every document start.
    Returns:
        o: (B, L, H, V) in v's dtype, and the final state (B, H, K, V) in fp32 (or wider) if requested.
    """
    out_dtype, length = v.dtype, v.shape[1]
    q, k, v, g, beta = _prepare(q, k, v, g, beta, scale)
    pad = -length % chunk_size
    # Padded steps have g = 0 and beta = 0: decay 1 and u = 0, so the final state is unchanged.
    q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
    g, beta = (F.pad(t, (0, 0, 0, pad)) for t in (g, beta))
    q, k, v = (rearrange(t, "b (c t) h d -> b h c t d", t=chunk_size) for t in (q, k, v))
    g, beta = (rearrange(t, "b (c t) h -> b h c t", t=chunk_size) for t in (g, beta))

    decay = torch.exp(segsum(g))  # (B, H, c, T, T): G_i / G_j for j <= i, 0 above the diagonal
    g_cs = g.cumsum(-1)  # (B, H, c, T)
    from_start = torch.exp(g_cs)  # G_i: the entering state's decay to position i
    k_to_end = k * torch.exp(g_cs[..., -1:] - g_cs)[..., None]  # exponents <= 0
    chunk_decay = torch.exp(g_cs[..., -1])  # (B, H, c)
    if doc_ids is not None:
        seg = rearrange(pad_segments(segments(doc_ids), pad), "b (c t) -> b c t", t=chunk_size)[:, None]
        entering, ending = chunk_labels(seg[:, 0])  # (B, c)
        decay = decay * (seg[..., :, None] == seg[..., None, :])
        from_start = from_start * (seg == entering[:, None, :, None])
        k_to_end = k_to_end * (seg == ending[:, None, :, None])[..., None]
        chunk_decay = chunk_decay * (entering == ending)[:, None]
    strict = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril(-1)
    A = (beta[..., None] * (k @ k.transpose(-1, -2)) * decay).masked_fill(~strict, 0)
    eye = torch.eye(chunk_size, dtype=q.dtype, device=q.device)
    rhs = torch.cat([beta[..., None] * v, beta[..., None] * from_start[..., None] * k], dim=-1)
    solved = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
    u_free, w = solved.split([v.shape[-1], k.shape[-1]], dim=-1)  # U = u_free - w S_0; (B, H, c, T, V|K)

    scores = (q @ k.transpose(-1, -2)) * decay  # (B, H, c, T, T), causal (diagonal included)
    q_decayed = q * from_start[..., None]

    batch, heads, n_chunks = q.shape[:3]
    state = q.new_zeros(batch, heads, k.shape[-1], v.shape[-1]) if initial_state is None \
        else initial_state.to(q.dtype)
    outs = []
    for c in range(n_chunks):  # a recurrence over chunks, not over time
        u = u_free[:, :, c] - w[:, :, c] @ state  # (B, H, T, V)
        outs.append(q_decayed[:, :, c] @ state + scores[:, :, c] @ u)
        state = chunk_decay[:, :, c, None, None] * state + k_to_end[:, :, c].transpose(-1, -2) @ u
    o = rearrange(torch.stack(outs, dim=2), "b h c t d -> b (c t) h d")[:, :length].to(out_dtype)
    return (o, state) if return_final_state else o


def delta_rule_ref(q, k, v, g, beta, scale=None, initial_state=None, return_final_state=False, doc_ids=None):
    """Sequential reference of `delta_rule_chunked` (a loop over time; tests and benchmarks only)."""
    out_dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta, scale)
    batch, length, heads, d_k = k.shape
    state = q.new_zeros(batch, heads, d_k, v.shape[-1]) if initial_state is None else initial_state.to(q.dtype)
    keep = None if doc_ids is None else ~starts(doc_ids)  # (B, L): False where the state resets
    outs = []
    for t in range(length):
        kt, bt = k[:, t], beta[:, t, :, None]  # (B, H, K), (B, H, 1)
        state = torch.exp(g[:, t])[..., None, None] * state  # alpha_t S_{t-1}
        if keep is not None:
            state = state * keep[:, t, None, None, None]
        # (I - beta k k^T) alpha S + beta k v^T = alpha S + k (beta (v - (alpha S)^T k))^T
        u = bt * (v[:, t] - torch.einsum("bhkv,bhk->bhv", state, kt))
        state = state + kt[..., None] * u[..., None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    o = torch.stack(outs, dim=1).to(out_dtype)
    return (o, state) if return_final_state else o


def delta_rule_step(state, q, k, v, g, beta, scale=None):
    """One recurrent step; updates `state` in place.

    Args:
        state: (B, H, K, V) fp32. q, k: (B, H, K). v: (B, H, V). g, beta: (B, H).
    Returns:
        o: (B, H, V) in v's dtype.
    """
    o, new_state = delta_rule_ref(q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None], scale,
                                  initial_state=state, return_final_state=True)
    state.copy_(new_state)
    return o[:, 0]
