"""Multi-head / grouped-query attention through scaled_dot_product_attention, optional RoPE and sliding window.

The input width (d_input) may differ from the output width (d_model): Zamba's shared block attends
in 2 * d_model (residual stream concatenated with the embeddings) and projects back to d_model.
With `window` each query sees only its last `window` keys (itself included) and the generation cache
keeps only those (`SlidingKVCache`). "W" is that form with a window by default, so that one layout
can mix full and sliding-window layers (Hymba, Samba); see `blocks.sliding_attention`.
With document ids (`blocks.ops.documents`) attention is document-causal: a query sees only earlier keys of
its own document (a block-diagonal causal mask), and RoPE positions restart at every document.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from blocks.base import Block, BlockConfig, KVCache, SlidingKVCache, check, linear_flops, project
from blocks.ops.backend import importable
from blocks.ops.documents import positions, segments
from blocks.ops.window import sliding_window_attention
from blocks.registry import register


@dataclass
class AttentionConfig(BlockConfig):
    n_heads: int = 8
    n_kv_heads: int | None = None  # None: n_heads (MHA); fewer: GQA
    head_dim: int | None = None  # None: d_input // n_heads
    d_input: int | None = None  # None: d_model
    rope: bool = False
    rope_theta: float = 10000.0
    rope_dim: int | None = None  # None: head_dim; fewer: rotate only the first rope_dim channels (Bamba: half)
    softmax_scale: float | None = None  # None: head_dim ** -0.5
    bias: bool = False
    v_head_dim: int | None = None  # None: head_dim; Hymba widens values to its SSM heads' width
    window: int | None = None  # None: full causal; w: each query sees its last w keys (itself included)
    out_proj: bool = True  # False: return the heads' outputs, d_inner wide (a parallel layer projects them)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.d_input = self.d_input or self.d_model
        check(self.n_heads > 0 and self.n_heads % self.n_kv_heads == 0,
              f"attention: n_heads = {self.n_heads} must be a positive multiple of n_kv_heads = {self.n_kv_heads}")
        if self.head_dim is None:
            check(self.d_input % self.n_heads == 0,
                  f"attention: input width {self.d_input} is not divisible by n_heads = {self.n_heads}")
            self.head_dim = self.d_input // self.n_heads
        self.rope_dim = self.rope_dim or self.head_dim
        check(not self.rope or (self.rope_dim % 2 == 0 and self.rope_dim <= self.head_dim),
              f"attention: RoPE needs an even rope_dim of at most head_dim = {self.head_dim}, got {self.rope_dim}")
        self.v_head_dim = self.v_head_dim or self.head_dim
        check(self.window is None or (isinstance(self.window, int) and self.window >= 1),
              f"attention: window must be a positive number of keys or None (full attention), got {self.window!r}")

    @property
    def d_inner(self) -> int:
        """Width of the heads' concatenated outputs, before the output projection."""
        return self.n_heads * self.v_head_dim


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """Llama-style rotary tables for integer positions (..., T) -> cos, sin of shape (..., T, head_dim), fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, Dh), cos / sin: (T, R) or (B, 1, T, R) with R <= Dh; rotates pairs (i, i + R/2) of the first R
    channels, as HF's rotate_half does, and passes the other Dh - R channels through (partial rotary). Computed in
    fp32; on CUDA by one Triton kernel each way (`blocks.ops.rope_triton`), except under torch.compile."""
    if x.is_cuda and not torch.compiler.is_compiling() and importable("triton"):
        from blocks.ops.rope_triton import rope

        return rope(x, cos, sin, False)
    rot, rest = x.float().split([cos.shape[-1], x.shape[-1] - cos.shape[-1]], dim=-1)
    x1, x2 = rot.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1).to(x.dtype)


@register("attention", "A", AttentionConfig, kind="mixer")
class Attention(Block):
    def __init__(self, config: AttentionConfig):
        super().__init__(config)
        c = config
        self.q_proj = nn.Linear(c.d_input, c.n_heads * c.head_dim, bias=c.bias)
        self.k_proj = nn.Linear(c.d_input, c.n_kv_heads * c.head_dim, bias=c.bias)
        self.v_proj = nn.Linear(c.d_input, c.n_kv_heads * c.v_head_dim, bias=c.bias)
        self.o_proj = nn.Linear(c.d_inner, c.d_model, bias=c.bias) if c.out_proj else None

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, qkv_delta=None,
                doc_ids: torch.Tensor | None = None, position: torch.Tensor | None = None,
                **context) -> torch.Tensor:
        """x: (B, T, d_input) -> (B, T, d_model), or (B, T, d_inner) without out_proj.

        qkv_delta: optional additive (q, k, v) projections (per-invocation LoRA). With a cache, the T new
        positions follow the cache's filled ones and are appended to it. doc_ids: (B, T) document ids (no
        cache): document-causal attention, RoPE positions counted within each document. position: a 0-dim
        int64 tensor, the fixed-shape step (T = 1, `hybrids.decode`): the new key and value go to that slot of
        the preallocated cache and the query attends over every slot up to it by mask; `cache.length` is left
        as it was.
        """
        c = self.config
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if qkv_delta is not None:
            q, k, v = q + qkv_delta[0], k + qkv_delta[1], v + qkv_delta[2]
        q = rearrange(q, "b t (h d) -> b h t d", d=c.head_dim)
        k = rearrange(k, "b t (h d) -> b h t d", d=c.head_dim)
        v = rearrange(v, "b t (h d) -> b h t d", d=c.v_head_dim)
        if position is not None:
            return project(self.o_proj, self._static_step(q, k, v, cache, position))
        start = cache.length if cache is not None else 0
        new = x.shape[1]
        if c.rope:
            pos = torch.arange(start, start + new, device=x.device) if doc_ids is None else positions(doc_ids)[:, None]
            cos, sin = rope_cos_sin(pos, c.rope_dim, c.rope_theta)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)  # the new queries are the last `new` positions of k and v
        gqa = c.n_kv_heads != c.n_heads
        if c.window is not None:
            y = sliding_window_attention(q, k, v, c.window, scale=c.softmax_scale, enable_gqa=gqa, doc_ids=doc_ids)
        elif doc_ids is not None:
            seg = segments(doc_ids)
            mask = (seg[:, None, :, None] == seg[:, None, None, :]).tril()  # (B, 1, T, T), block-diagonal causal
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=c.softmax_scale, enable_gqa=gqa)
        else:
            mask = None
            if start and new > 1:  # new positions see all cached ones and the causal part of their own block
                mask = torch.ones(new, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=start == 0 and new > 1,
                                               scale=c.softmax_scale, enable_gqa=gqa)
        y = rearrange(y, "b h t d -> b t (h d)")
        return project(self.o_proj, y)

    @property
    def static_step(self) -> bool:
        """Full attention only: a sliding window's rolling cache moves keys by a Python count."""
        return self.config.window is None

    def _static_step(self, q, k, v, cache: KVCache, position: torch.Tensor) -> torch.Tensor:
        """q, k, v: (B, H, 1, Dh) of the token at `position` -> (B, 1, H * Dv), shapes independent of position."""
        c = self.config
        if c.window is not None or type(cache) is not KVCache:
            raise ValueError("the fixed-shape decoding step needs full attention with a KVCache (no window)")
        if c.rope:
            cos, sin = rope_cos_sin(position[None], c.rope_dim, c.rope_theta)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.k.index_copy_(2, position[None], k)
        cache.v.index_copy_(2, position[None], v)
        seen = torch.arange(cache.k.shape[2], device=q.device)[None] <= position  # (1, S): the slots filled so far
        y = F.scaled_dot_product_attention(q, cache.k, cache.v, attn_mask=seen, scale=c.softmax_scale,
                                           enable_gqa=c.n_kv_heads != c.n_heads)
        return rearrange(y, "b h t d -> b t (h d)")

    def allocate_cache(self, batch, max_seqlen, device=None, dtype=None) -> KVCache:
        """Keys and values for max_seqlen positions, or a rolling cache of min(max_seqlen, window)."""
        c = self.config
        dtype = dtype or self.q_proj.weight.dtype
        positions = self._cached_positions(max_seqlen)
        zeros = dict(device=device, dtype=dtype)
        k = torch.zeros(batch, c.n_kv_heads, positions, c.head_dim, **zeros)
        v = torch.zeros(batch, c.n_kv_heads, positions, c.v_head_dim, **zeros)
        return KVCache(k=k, v=v) if c.window is None else SlidingKVCache(k=k, v=v, window=c.window)

    def _cached_positions(self, seq_len: int) -> int:
        return seq_len if self.config.window is None else min(seq_len, self.config.window)

    def step(self, x: torch.Tensor, cache: KVCache, **context) -> torch.Tensor:
        return self.forward(x, cache, **context)

    def cache_bytes(self, batch, seq_len, dtype=torch.bfloat16) -> dict[str, int]:
        c = self.config
        per_position = c.n_kv_heads * (c.head_dim + c.v_head_dim) * dtype.itemsize
        return {"kv": batch * self._cached_positions(seq_len) * per_position, "state": 0}

    def flops_per_token(self, seq_len: int) -> int:
        """Projections plus QK^T and AV, averaged over the positions 1..seq_len (each reads min(i, window) keys)."""
        c = self.config
        per_key = 2 * c.n_heads * (c.head_dim + c.v_head_dim)
        return linear_flops(self.q_proj, self.k_proj, self.v_proj, self.o_proj) \
            + per_key * keys_read(seq_len, c.window) // seq_len


def keys_read(seq_len: int, window: int | None) -> int:
    """Keys read by all queries at positions 1..seq_len together: position i reads min(i, window)."""
    reach = seq_len if window is None else min(window, seq_len)
    return reach * (reach + 1) // 2 + (seq_len - reach) * reach

