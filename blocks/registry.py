"""The block registry: symbol and name -> block class with a typed config.

A layout string refers to blocks by symbol ("M", "M2", "A", ...); configs and CLIs refer to them by
name ("mamba", "mamba2", "attention", ...). Both keys are unique across the registry.

Other installed packages add blocks through the `hybrids.blocks` entry-point group: each entry names a
module (or an object in one) whose import registers blocks with `register`. They are loaded on the first
lookup (`get`, `entries`, `symbols`, `describe`), so every process that reads the registry, the CLI and
freshly spawned sweep workers alike, sees them without importing anything itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata

from blocks.base import ConfigError

ENTRY_POINT_GROUP = "hybrids.blocks"


class RegistryError(KeyError):
    """An unknown or duplicate block name or symbol."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


@dataclass(frozen=True)
class Entry:
    name: str
    symbol: str
    cls: type
    config_cls: type
    kind: str  # "mixer", "mlp", "shared" or "parallel"


KINDS = ("mixer", "mlp", "shared", "parallel")
_by_name: dict[str, Entry] = {}
_by_symbol: dict[str, Entry] = {}
_plugins_loaded = False


def register(name: str, symbol: str, config_cls: type, kind: str):
    """Class decorator that registers a block under a unique name and symbol.

    Args:
        name: lower-case name used in configs ("mamba2").
        symbol: layout symbol, an upper-case letter optionally followed by digits ("M2").
        config_cls: the block's typed config dataclass.
        kind: "mixer" (sequence mixer), "mlp" (channel mixer), "shared" (a weight-shared block) or
            "parallel" (mixers side by side, written "(A|M2)" in layouts).
    Returns:
        The decorator; it sets `name`, `symbol`, `config_cls` and `kind` on the class.
    """
    if kind not in KINDS:
        raise ValueError(f"block kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not (symbol[:1].isalpha() and symbol[:1].isupper() and (symbol[1:] == "" or symbol[1:].isdigit())):
        raise ValueError(f"block symbol must be an upper-case letter and optional digits, got {symbol!r}")

    def wrap(cls: type) -> type:
        if name in _by_name:
            raise RegistryError(f"block name {name!r} is already registered (by {_by_name[name].cls.__name__})")
        if symbol in _by_symbol:
            raise RegistryError(
                f"block symbol {symbol!r} is already registered (by {_by_symbol[symbol].cls.__name__})"
            )
        entry = Entry(name, symbol, cls, config_cls, kind)
        _by_name[name] = _by_symbol[symbol] = entry
        cls.name, cls.symbol, cls.config_cls, cls.kind = name, symbol, config_cls, kind
        return cls

    return wrap


def unregister(name: str) -> None:
    """Remove a block (used by tests and plugins that replace a block)."""
    entry = get(name)
    del _by_name[entry.name], _by_symbol[entry.symbol]


def load_plugins() -> None:
    """Import the modules of the `hybrids.blocks` entry points once, which registers their blocks.

    Raises:
        ConfigError: an entry point that fails to import (named, with its error, in one line).
    """
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True  # before loading: a plugin that looks blocks up while it imports must not recurse
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as err:  # any import-time failure of third-party code
            raise ConfigError(f"block plugin {ep.name!r} ({ep.value}, entry point group {ENTRY_POINT_GROUP}) "
                              f"failed to load: {type(err).__name__}: {err}") from None


def get(key: str) -> Entry:
    """Look a block up by name or symbol.

    Raises:
        RegistryError: naming the valid names and symbols.
    """
    load_plugins()
    entry = _by_name.get(key) or _by_symbol.get(key)
    if entry is None:
        raise RegistryError(f"unknown block {key!r}; valid blocks: {describe()}")
    return entry


def entries() -> list[Entry]:
    """All registered blocks, in registration order (built-in blocks, then those of plugins)."""
    load_plugins()
    return list(_by_name.values())


def symbols() -> list[str]:
    return [e.symbol for e in entries()]


def describe() -> str:
    """'M (mamba), M2 (mamba2), ...' for error messages and help texts."""
    return ", ".join(f"{e.symbol} ({e.name})" for e in entries())
