"""Blocks of hybrid SSM / attention models, their registry and their numeric ops."""

from blocks.base import Block, BlockConfig, Cache, ConfigError, KVCache, RecurrentCache, SlidingKVCache
from blocks.registry import RegistryError, describe, entries, get, register

__all__ = [
    "Block",
    "BlockConfig",
    "Cache",
    "ConfigError",
    "KVCache",
    "RecurrentCache",
    "RegistryError",
    "SlidingKVCache",
    "describe",
    "entries",
    "get",
    "register",
]

# Importing the block modules registers them.
# The order is the registry's listing order.
from blocks import mamba, mamba2, attention, mlp, moe, shared, sliding_attention, parallel  # noqa: E402, F401, I001
from blocks import gated_deltanet, hyena  # noqa: E402, F401, I001
