"""Sliding-window causal attention: each query sees its last `window` keys (itself included).

The queries are the last T positions of the keys' span: key j (0-based among S keys) sits at position
S - T + j relative to query 0, so a cache of earlier keys simply precedes the new ones. Queries run in
chunks, each against only the keys its window can reach, so memory grows with T * (chunk + window), not T^2.
With document ids (`blocks.ops.documents`) a query also sees only keys of its own document.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from blocks.ops.documents import segments


def band_mask(n_queries: int, n_keys: int, window: int, device=None) -> torch.Tensor:
    """(n_queries, n_keys) bool, True where a query may attend: query i sits at key position
    n_keys - n_queries + i and sees keys i - window < j <= i in that frame."""
    q_pos = torch.arange(n_keys - n_queries, n_keys, device=device)[:, None]
    k_pos = torch.arange(n_keys, device=device)[None, :]
    return (k_pos <= q_pos) & (k_pos > q_pos - window)


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                             scale: float | None = None, enable_gqa: bool = False, chunk: int = 256,
                             doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Chunked sliding-window attention through scaled_dot_product_attention.

    Args:
        q: (B, H, T, Dh) queries, the last T positions. k: (B, Hkv, S, Dh), v: (B, Hkv, S, Dv) with S >= T.
        window: keys per query, >= 1. scale: softmax scale (None: Dh ** -0.5). enable_gqa: H a multiple of Hkv.
        chunk: queries per SDPA call (at least `window` are used). doc_ids: (B, S) document ids of the keys (the
            queries' are their last T) or None.
    Returns:
        (B, H, T, Dv).
    """
    n_queries, n_keys = q.shape[2], k.shape[2]
    offset = n_keys - n_queries  # key index of query 0's own position
    step = max(chunk, window)
    seg = segments(doc_ids) if doc_ids is not None else None
    outs = []
    for a in range(0, n_queries, step):
        b = min(a + step, n_queries)
        lo = max(0, offset + a - window + 1)  # first key the chunk's first query can see
        hi = offset + b
        mask = band_mask(b - a, hi - lo, window, q.device)
        if seg is not None:  # (B, 1, queries, keys)
            mask = mask & (seg[:, None, offset + a : hi, None] == seg[:, None, None, lo:hi])
        outs.append(F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, lo:hi], v[:, :, lo:hi], attn_mask=mask,
                                                   scale=scale, enable_gqa=enable_gqa))
    return torch.cat(outs, dim=2)


def sliding_window_attention_ref(q, k, v, window, scale=None):
    """Reference of `sliding_window_attention` (tests only): softmax over all keys with an explicit band mask.

    Shapes as there; Hkv may divide H (keys and values are repeated per group).
    """
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    mask = band_mask(q.shape[2], k.shape[2], window, q.device)
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
