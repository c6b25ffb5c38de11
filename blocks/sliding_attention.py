"""Sliding-window attention as its own layout symbol "W", so one layout mixes full ("A") and windowed layers.

It is `blocks.attention.Attention` with a window by default; its options live under `blocks.sliding_attention`
(heads, RoPE, window), apart from those of full attention.
"""

from __future__ import annotations

from dataclasses import dataclass

from blocks.attention import Attention, AttentionConfig
from blocks.base import check
from blocks.registry import register


@dataclass
class SlidingAttentionConfig(AttentionConfig):
    window: int | None = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.window is not None, "sliding_attention: window must be a positive number of keys; "
                                       "use A for full attention")


@register("sliding_attention", "W", SlidingAttentionConfig, kind="mixer")
class SlidingWindowAttention(Attention):
    """Each query sees its last `window` keys; the generation cache holds min(length, window) positions."""
