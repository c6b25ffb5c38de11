"""The protocol every block follows, its config base and its caches.

The model never special-cases a block by name: it calls `forward` (whole sequence, optionally filling a
cache), `allocate_cache` + `step` (one token at a time) and the accounting hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn


class ConfigError(ValueError):
    """A block config value that cannot work (impossible dimensions, unknown option)."""


@dataclass
class BlockConfig:
    """Fields every block config has; subclasses add theirs and validate in `__post_init__`."""

    d_model: int

    def __post_init__(self) -> None:
        check(self.d_model > 0, f"d_model must be positive, got {self.d_model}")


def check(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless ok."""
    if not ok:
        raise ConfigError(message)


@dataclass
class Cache:
    """Base of the per-block inference caches; every tensor field counts toward `nbytes`."""

    def tensors(self) -> list[torch.Tensor]:
        return [v for f in fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def nbytes_by_kind(self) -> dict[str, int]:
        """{"kv": attention keys and values, "state": recurrent state}, as `Block.cache_bytes` splits them."""
        return {"kv": 0, "state": self.nbytes()}


@dataclass
class RecurrentCache(Cache):
    """Mamba-style state: the last d_conv inputs of the causal conv and the SSM state."""

    conv: torch.Tensor  # (B, C, d_conv)
    ssm: torch.Tensor  # Mamba1 (B, d_inner, d_state); Mamba2 (B, n_heads, headdim, d_state)


@dataclass
class KVCache(Cache):
    """Attention keys and values, preallocated to max_seqlen; `length` positions are filled."""

    k: torch.Tensor  # (B, n_kv_heads, max_seqlen, head_dim)
    v: torch.Tensor  # (B, n_kv_heads, max_seqlen, v_head_dim)
    length: int = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, H, T, Dh) new keys/values after the filled part; return all filled keys/values."""
        end = self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions, asked to fill {end}")
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def nbytes_by_kind(self) -> dict[str, int]:
        return {"kv": self.nbytes(), "state": 0}


@dataclass
class SlidingKVCache(KVCache):
    """A rolling cache of the last keys and values, oldest first, in min(max_seqlen, window) slots.

    `length` counts every position seen; the held ones fill the last min(length, slots) slots. Slots fewer than
    the window (a short max_seqlen) can never drop a key that a later query still sees: filling more is an error.
    """

    window: int | None = None  # keys each query sees; None: as many as the slots

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Take (B, H, T, Dh) new keys/values; return the held ones followed by the new ones, then keep the last
        slots' worth of them."""
        window = self.k.shape[2]
        if window < (self.window or window) and self.length + k.shape[2] > window:
            raise ValueError(f"KV cache holds {window} positions, asked to fill {self.length + k.shape[2]}")
        held = min(self.length, window)
        keys = torch.cat([self.k[:, :, window - held :], k], dim=2)
        values = torch.cat([self.v[:, :, window - held :], v], dim=2)
        keep = min(window, keys.shape[2])
        self.k[:, :, window - keep :] = keys[:, :, -keep:]
        self.v[:, :, window - keep :] = values[:, :, -keep:]
        self.length += k.shape[2]
        return keys, values


class Block(nn.Module):
    """Base class of registered blocks.

    Subclasses get `name`, `symbol`, `config_cls` and `kind` from `blocks.registry.register`.
    """

    name: str
    symbol: str
    config_cls: type
    kind: str
    # Whether `step(x, cache, position=t)` (t: 0-dim int64 tensor, the new token's index) keeps every shape from
    # token to token and never waits on the host: the fixed-shape decoding of `hybrids.decode` (CUDA graphs).
    static_step: bool = True

    def __init__(self, config: BlockConfig):
        super().__init__()
        self.config = config

    def forward(self, x: torch.Tensor, cache: Cache | None = None, **context) -> torch.Tensor:
        """Whole-sequence form. x: (B, L, d_model). With a cache, also leave it ready for `step`.

        context may hold doc_ids (B, L), the document ids of packed rows (`blocks.ops.documents`): a mixer
        then lets nothing cross a document start; position-wise blocks ignore them.
        """
        raise NotImplementedError

    def allocate_cache(
        self, batch: int, max_seqlen: int, device=None, dtype: torch.dtype | None = None
    ) -> Cache | None:
        """An empty cache for generation, or None for position-wise blocks."""
        return None

    def step(self, x: torch.Tensor, cache: Cache | None, **context) -> torch.Tensor:
        """One-token form. x: (B, 1, d_model); updates cache in place."""
        return self.forward(x, None, **context)

    def cache_bytes(self, batch: int, seq_len: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
        """Bytes of the cache this block keeps at seq_len: {"kv": ..., "state": ...}."""
        return {"kv": 0, "state": 0}

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token at seq_len (multiply-add = 2 FLOPs), matrix products and scans."""
        raise NotImplementedError

    def aux_loss(self) -> torch.Tensor | None:
        """An auxiliary loss from the last forward (MoE load balancing), or None."""
        return None

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        """Initialise for training from scratch, as HF's Zamba, Zamba2 and Jamba do: every Linear weight
        (nested blocks included) N(0, std), biases zero. Subclasses re-apply what must differ (zero LoRA
        up-projections, expert weights); SSM parameters (A_log, dt bias, D), convolutions and norm weights
        keep what the constructor set.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Recurrent states are kept in fp32 at least (as the kernels keep them), whatever the model dtype."""
    return torch.promote_types(dtype, torch.float32)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """t in fp32, or wider if it already is (float64 models stay exact)."""
    return t.to(state_dtype(t.dtype))


def project(linear: nn.Linear | None, x: torch.Tensor) -> torch.Tensor:
    """linear(x), or x itself for a block built without that projection (out_proj=False)."""
    return x if linear is None else linear(x)


def linear_flops(*linears: nn.Linear | None) -> int:
    """2 * in * out per token for each given Linear (None entries skipped)."""
    return sum(2 * m.in_features * m.out_features for m in linears if m is not None)
