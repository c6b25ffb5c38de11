"""Zamba's shared attention block: one weight set, invoked at several depths.

    y = out_proj_i( MLP_i( norm( Attention_i( norm( concat(x, emb) ) ) ) ) )

concat with the original embeddings is optional (then attention runs in 2 * d_model); i is the
invocation: each invocation owns its output projection Linear(d_model, d_model) and, optionally, LoRA
adapters on the MLP's [gate, up] projection and on q/k/v (Zamba2). There are no residual adds inside;
the model adds the output to the input of the next block (or to the residual stream).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from blocks.attention import Attention, AttentionConfig
from blocks.base import Block, BlockConfig, KVCache, check, linear_flops
from blocks.mlp import MLP, MLPConfig
from blocks.norm import RMSNorm
from blocks.ops.backend import check_backend
from blocks.registry import register


@dataclass
class SharedAttentionConfig(BlockConfig):
    n_heads: int = 8
    n_kv_heads: int | None = None
    head_dim: int | None = None  # None: attention width // n_heads
    d_ff: int | None = None  # None: 4 * d_model
    activation: str = "gelu"
    concat_embeddings: bool = True
    rope: bool = False
    rope_theta: float = 10000.0
    softmax_scale: float | None = None  # None: (head_dim / 2) ** -0.5 as Zamba (HF) uses
    n_invocations: int = 1
    lora_rank: int = 0  # LoRA on the MLP's [gate, up] projection, per invocation; 0: off
    attn_lora_rank: int = 0  # LoRA on q, k, v, per invocation; 0: off
    out_proj: bool = True  # per-invocation Linear(d_model, d_model) on the output
    norm_eps: float = 1e-5
    backend: str = "auto"  # of the norms (the model's backend)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_backend(self.backend)
        check(self.n_invocations > 0, f"shared block: n_invocations must be positive, got {self.n_invocations}")
        check(self.lora_rank >= 0 and self.attn_lora_rank >= 0, "shared block: LoRA ranks must be >= 0")

    @property
    def d_attn(self) -> int:
        return 2 * self.d_model if self.concat_embeddings else self.d_model


def lora(d_in: int, rank: int, d_out: int) -> nn.Sequential:
    """Linear(d_in, rank) -> Linear(rank, d_out), no bias; the up matrix starts at zero (a no-op)."""
    up = nn.Linear(rank, d_out, bias=False)
    nn.init.zeros_(up.weight)
    return nn.Sequential(nn.Linear(d_in, rank, bias=False), up)


class Invocation(nn.Module):
    """The unshared parts of one invocation of the shared block."""

    def __init__(self, c: SharedAttentionConfig, attn: AttentionConfig, d_up: int):
        super().__init__()
        self.out_proj = nn.Linear(c.d_model, c.d_model, bias=False) if c.out_proj else None
        self.mlp_lora = lora(c.d_model, c.lora_rank, d_up) if c.lora_rank else None
        r = c.attn_lora_rank
        widths = (attn.n_heads * attn.head_dim, attn.n_kv_heads * attn.head_dim, attn.n_kv_heads * attn.head_dim)
        self.qkv_lora = nn.ModuleList([lora(c.d_attn, r, w) for w in widths]) if r else None


@register("shared_attention", "S", SharedAttentionConfig, kind="shared")
class SharedAttention(Block):
    def __init__(self, config: SharedAttentionConfig):
        super().__init__(config)
        c = config
        attn_config = AttentionConfig(
            d_model=c.d_model, d_input=c.d_attn, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
            head_dim=c.head_dim, rope=c.rope, rope_theta=c.rope_theta, softmax_scale=c.softmax_scale,
        )
        if c.softmax_scale is None:
            attn_config.softmax_scale = (attn_config.head_dim / 2) ** -0.5
        self.input_norm = RMSNorm(c.d_attn, c.norm_eps, c.backend)
        self.attn = Attention(attn_config)
        self.pre_ff_norm = RMSNorm(c.d_model, c.norm_eps, c.backend)
        self.mlp = MLP(MLPConfig(d_model=c.d_model, d_ff=c.d_ff, activation=c.activation))
        self.invocations = nn.ModuleList(
            [Invocation(c, attn_config, self.mlp.up_proj.out_features) for _ in range(c.n_invocations)]
        )

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, *, emb: torch.Tensor | None = None,
                invocation: int = 0, **context) -> torch.Tensor:
        """x: (B, T, d_model) residual stream; emb: (B, T, d_model) original embeddings (if concat); context
        (doc_ids) goes to the attention."""
        c = self.config
        check(0 <= invocation < c.n_invocations,
              f"shared block: invocation {invocation} out of range 0..{c.n_invocations - 1}")
        inv = self.invocations[invocation]
        if c.concat_embeddings:
            check(emb is not None, "shared block: concat_embeddings needs the original embeddings (emb=...)")
            x = torch.cat([x, emb], dim=-1)
        h = self.input_norm(x)
        qkv_delta = [adapter(h) for adapter in inv.qkv_lora] if inv.qkv_lora is not None else None
        h = self.pre_ff_norm(self.attn(h, cache, qkv_delta=qkv_delta, **context))
        h = self.mlp(h, up_delta=inv.mlp_lora(h) if inv.mlp_lora is not None else None)
        return inv.out_proj(h) if inv.out_proj is not None else h

    def allocate_cache(self, batch, max_seqlen, device=None, dtype=None) -> KVCache:
        """One invocation's KV cache (the model keeps one per invocation)."""
        return self.attn.allocate_cache(batch, max_seqlen, device, dtype)

    def step(self, x: torch.Tensor, cache: KVCache, **context) -> torch.Tensor:
        return self.forward(x, cache, **context)

    def cache_bytes(self, batch, seq_len, dtype=torch.bfloat16) -> dict[str, int]:
        return self.attn.cache_bytes(batch, seq_len, dtype)

    def flops_per_token(self, seq_len: int) -> int:
        """One invocation (the shared weights run at every invocation)."""
        inv = self.invocations[0]
        adapters = [*(inv.mlp_lora or []), *(m for a in (inv.qkv_lora or []) for m in a), inv.out_proj]
        return self.attn.flops_per_token(seq_len) + self.mlp.flops_per_token(seq_len) + linear_flops(*adapters)

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        """N(0, std) Linear weights, but every LoRA up-projection back at zero: adapters start as no-ops."""
        super().init_weights(std)
        for inv in self.invocations:
            for adapter in [inv.mlp_lora, *(inv.qkv_lora or [])]:
                if adapter is not None:
                    nn.init.zeros_(adapter[1].weight)

    def shared_parameters(self) -> list[nn.Parameter]:
        """The weights every invocation uses (everything outside `invocations`)."""
        return [p for n, p in self.named_parameters() if not n.startswith("invocations.")]
