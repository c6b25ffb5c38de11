"""The layout DSL: which block sits at which depth of a hybrid model, as one short string.

Grammar (symbols are looked up in `blocks.registry` at parse time)::

    layout   = item { ":" item }
    item     = [ count ] token | "(" layout ")" [ "x" count ]
    token    = mixer "*" [ count | name ]       a shared-block invocation
             | mixer [ "+" symbol ]             a backbone layer: mixer [+ mlp], or a lone mlp
    mixer    = symbol | "(" symbol "|" symbol { "|" symbol } ")"    one block, or mixers side by side
    symbol   = "A".."Z" { "0".."9" }            e.g. M, M2, A, W, G, H, F, E
    count    = "1".."9" { "0".."9" }            >= 1, no leading zeros
    name     = "a".."z" { "a".."z" | "0".."9" | "_" }

Whitespace may surround ':', '+', 'x', '(' and ')' but not split a unit such as "6M", "M2" or "A*2".

Examples:
    "6M:A*"        six Mamba layers, then one invocation of the shared attention block.
    "3M+F"         three layers of Mamba mixer + MLP; "M+E" is a Jamba layer (Mamba + MoE), "F" an MLP layer.
    "3(W|M)+F"     three parallel layers (Hymba): sliding-window attention and Mamba heads over the same input,
                   outputs normed and averaged (blocks.parallel), then an MLP; "(A|M2)*" shares one such layer.
    "(6M:A*)x13"   a group repeated 13 times; groups nest.
    "2A*"          two consecutive invocations of the same shared weights.
    "(6M:A*2)x4"   round-robin: two weight sets, invocation i (counted over the whole layout) uses set i % 2
                   (Zamba2's A,B,A,B).
    "6M:A*x:6M:A*y:6M:A*x"   named weight sets for any assignment ("A*x2" is the set named "x2").

Shared invocations ("*") are not backbone layers: a layout's depth counts backbone layers only. Any block
may be shared; one registered with kind "shared" (Zamba's "S") must be. One symbol uses one form throughout:
"A*2" and "A*3", or "A*2" and "A*x", in one layout are errors. A layout needs at least one backbone layer.

Canonical form (`str(layout)`; `parse_layout(str(x)) == x`): no whitespace; "A*1" is "A*"; a group
repeated once ("(6M:A*)x1" or "(6M:A*)") is spliced into its parent; a group around a single node absorbs
it ("(2M)x3" -> "6M"); neighbouring equal tokens or equal groups merge ("M:M:M" -> "3M",
"(M:A*)x2:(M:A*)x3" -> "(M:A*)x5"). Groups are otherwise kept as written: repetition is never searched for.

Depth and the end rule: `parse_layout(text, depth=N)` repeats the written layout (the period) and cuts it
right after the N-th backbone layer; shared invocations after that layer are dropped, since an invocation's
output feeds the next backbone layer and a trailing one would have no consumer. The same cut applies when
the written layout already has more than N layers. The whole repeats are written as one group:

    parse_layout("6M:A*", depth=78)  -> "(6M:A*)x12:6M"   78 layers, 12 invocations (the 13th is dropped)
    parse_layout("6M:A*", depth=14)  -> "(6M:A*)x2:2M"
    parse_layout("6M:A*", depth=6)   -> "6M"

Without depth a layout is taken exactly as written (a trailing "A*" stays). Zamba-7B, whose HF config calls
the shared block before Mamba layers [2, 7, 13, 19, ..., 73] of 76, is not a tiled period; write it exactly:

    "2M:A*:5M:A*:(6M:A*)x11:3M"      76 layers, 13 invocations
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from blocks import registry
from hybrids.layout_tile import (
    Group,
    Layer,
    Node,
    Parallel,
    Run,
    Star,
    format_tree,
    n_layers,
    normalize,
    size,
    tile,
    tokens,
    walk,
)

__all__ = ["Group", "Layer", "Layout", "LayoutError", "Parallel", "Run", "Shared", "Star", "parse_layout"]

MAX_NESTING = 32  # bounds the parser's recursion on inputs such as "((((...M))))"
MAX_ITEMS = 100_000  # expanded layers + invocations; far beyond any model, small enough to hold in memory

_SYMBOL = re.compile(r"[A-Z][0-9]*")
_COUNT = re.compile(r"[0-9]+")
_NAME = re.compile(r"[a-z][a-z0-9_]*")
_NO_LAYER = "the layout has no backbone layer (a block without '*'); it needs at least one"


class LayoutError(ValueError):
    """A layout that cannot be parsed or resolved.

    The message is the reason, then (when known) the layout text on one line and a caret under the
    offending character on the next. `reason`, `text` and `pos` hold the parts.
    """

    def __init__(self, reason: str, text: str | None = None, pos: int | None = None):
        self.reason, self.text, self.pos = reason, text, pos
        message = reason
        if text is not None:
            # One printed column per character, so the caret stays under its character.
            shown = "".join(" " if ch.isspace() else ch if ch.isprintable() else "?" for ch in text)
            message += f"\n  {shown}"
            if pos is not None:
                message += "\n  " + " " * pos + "^"
        super().__init__(message)


@dataclass(frozen=True)
class Shared:
    """One invocation of a shared block: `slot` is the set's name, or its index for round-robin sets."""

    symbol: str | Parallel
    slot: str | int

    def __str__(self) -> str:
        return f"{self.symbol}*{self.slot}" if isinstance(self.slot, str) else f"{self.symbol}*[{self.slot}]"


@dataclass(frozen=True, repr=False)
class Layout:
    """A resolved layout: its canonical tree and the expanded sequence of layers and invocations.

    Args:
        tree: layout nodes (normalized on construction); `parse_layout` is the usual way to build one.
    Raises:
        LayoutError: for a tree no layout string could produce.
    """

    tree: tuple[Node, ...]
    items: tuple[Layer | Shared, ...] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        tree = _normalize_checked(tuple(self.tree))
        object.__setattr__(self, "tree", tree)
        object.__setattr__(self, "items", _resolve(tree))

    def __str__(self) -> str:
        return format_tree(self.tree)

    def __repr__(self) -> str:
        return f"Layout({str(self)!r})"

    @property
    def n_layers(self) -> int:
        """Number of backbone layers (the model's depth; shared invocations excluded)."""
        return sum(isinstance(item, Layer) for item in self.items)

    @property
    def invocations(self) -> list[tuple[int, Shared]]:
        """(index in `items`, invocation) for every shared-block invocation, in order."""
        return [(i, item) for i, item in enumerate(self.items) if isinstance(item, Shared)]

    @property
    def invocation_layers(self) -> tuple[int, ...]:
        """For every invocation, the backbone layer it feeds (the number of backbone layers before it)."""
        return tuple(i - k for k, (i, _) in enumerate(self.invocations))

    @property
    def shared_sets(self) -> tuple[tuple[str, str | int], ...]:
        """The distinct (symbol, slot) weight sets the invocations use, in order of first use."""
        return tuple(dict.fromkeys((item.symbol, item.slot) for _, item in self.invocations))

    def describe(self) -> str:
        """A human-readable resolution, one line per backbone layer, to print and log with every run.

        Returns:
            Lines such as "layer 6: M  <- A*[0] invocation 0" (layers and invocations count from 0).
        """
        sets = ", ".join(str(Shared(*s)) for s in self.shared_sets) or "none"
        lines = [f"{self}: {self.n_layers} layers, {len(self.invocations)} shared invocations, "
                 f"shared weight sets: {sets}"]
        pending: list[str] = []
        layer = invocation = 0
        for item in self.items:
            if isinstance(item, Shared):
                pending.append(f"{item} invocation {invocation}")
                invocation += 1
            else:
                feeds = f"  <- {', '.join(pending)}" if pending else ""
                lines.append(f"layer {layer}: {item}{feeds}")
                pending, layer = [], layer + 1
        if pending:
            lines.append(f"after layer {layer - 1}: {', '.join(pending)} (no later layer consumes it)")
        return "\n".join(lines)


def _normalize_checked(tree: tuple[Node, ...]) -> tuple[Node, ...]:
    """The canonical tree, after checking it against the grammar and the block registry."""
    seen: dict[str, Star] = {}
    for node in walk(tree):
        count = node.count if isinstance(node, Run) else node.repeat
        if not _is_count(count):
            raise LayoutError(f"count must be an integer >= 1, got {count!r}")
        if isinstance(node, Run):
            problem = _token_problem(node.token) or _star_conflict(seen, node.token)
            if problem:
                raise LayoutError(problem)
    if size(tree) > MAX_ITEMS:
        raise LayoutError(f"the layout expands to {size(tree)} blocks; at most {MAX_ITEMS} are allowed")
    if n_layers(tree) == 0:
        raise LayoutError(_NO_LAYER)
    return normalize(tree)


def parse_layout(text: str, depth: int | None = None) -> Layout:
    """Parse a layout string and, given a depth, tile it (see the module docstring for grammar and rules).

    Args:
        text: the layout, e.g. "6M:A*" or "2M:A*:5M:A*:(6M:A*)x11:3M".
        depth: number of backbone layers to tile or cut the layout to; None takes it exactly as written.
    Returns:
        The resolved Layout; `str()` of it is the canonical form.
    Raises:
        LayoutError: with the text and a caret under the offending character.
    """
    if not isinstance(text, str):
        raise LayoutError(f"a layout must be a string, got {type(text).__name__}")
    if depth is not None and not (_is_count(depth) and depth <= MAX_ITEMS):
        raise LayoutError(f"depth must be an integer from 1 to {MAX_ITEMS}, got {depth!r}", text)
    from hybrids.layout_parse import Parser  # the parser reads this module's node types and checks

    tree = Parser(text).parse()
    try:
        return Layout(tree if depth is None else tile(tree, depth))
    except LayoutError as error:  # tiling can exceed MAX_ITEMS; show which text was tiled
        raise LayoutError(error.reason, text) from None


def _choices(kind: str | None = None) -> str:
    symbols = [e.symbol for e in registry.entries() if kind is None or e.kind == kind]
    return f"one of {', '.join(symbols)}" if symbols else "none is registered"


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _kind(symbol: str | Parallel | None) -> str | None:
    if isinstance(symbol, Parallel):
        return "mixer" if _parallel_problem(symbol) is None else None
    return registry.get(symbol).kind if symbol in registry.symbols() else None


def _parallel_problem(parallel: Parallel) -> str | None:
    """Why a parallel layer built outside the parser is invalid, or None."""
    if not isinstance(parallel.branches, tuple) or len(parallel.branches) < 2:
        return f"a parallel layer needs a tuple of at least two branches, got {parallel.branches!r}"
    for symbol in parallel.branches:
        if _kind(symbol) != "mixer":
            return f"{symbol!r} is not a mixer block; the branches of a parallel layer are mixers: {_choices('mixer')}"
    return None


def _token_problem(token: Layer | Star) -> str | None:
    """Why a token built outside the parser is invalid, or None."""
    if isinstance(token, Star):
        if isinstance(token.symbol, Parallel) and (problem := _parallel_problem(token.symbol)):
            return problem
        if _kind(token.symbol) is None:
            return f"unknown block symbol {token.symbol!r}; valid: {registry.describe()}"
        if _kind(token.symbol) == "parallel":
            return f"{token.symbol!r} is the parallel layer; give its branches, as in Parallel(('A', 'M2'))"
        sets = token.sets
        if isinstance(sets, str) and not _NAME.fullmatch(sets):
            return f"a weight-set name must match [a-z][a-z0-9_]*, got {sets!r}"
        if not isinstance(sets, str) and not _is_count(sets):
            return f"a shared block needs >= 1 weight sets, got {sets!r}"
        return None
    if token.mixer is None and token.mlp is None:
        return "a layer needs a mixer or an mlp block"
    if isinstance(token.mixer, Parallel) and (problem := _parallel_problem(token.mixer)):
        return problem
    if token.mixer is not None and _kind(token.mixer) != "mixer":
        return f"{token.mixer!r} is not a mixer block; mixers: {_choices('mixer')}"
    if token.mlp is not None and _kind(token.mlp) != "mlp":
        return f"{token.mlp!r} is not an mlp block; mlps: {_choices('mlp')}"
    return None


def _star_conflict(seen: dict[str, Star], star: Layer | Star) -> str | None:
    """Why `star` contradicts the first star of its symbol (recorded in `seen`), or None."""
    if not isinstance(star, Star):
        return None
    first = seen.setdefault(star.symbol, star)
    named = isinstance(first.sets, str), isinstance(star.sets, str)
    if named[0] != named[1]:
        return (f"shared block {star.symbol!r} is used both round-robin and with named sets "
                f"('{first}' and '{star}'); use one form per symbol")
    if not named[0] and first.sets != star.sets:
        return (f"'{star}' gives shared block {star.symbol!r} {star.sets} weight sets but '{first}' "
                f"gave it {first.sets}; use one count per symbol")
    return None


def _resolve(tree: tuple[Node, ...]) -> tuple[Layer | Shared, ...]:
    """Expand the tree, giving each round-robin invocation its weight set by invocation order."""
    calls: dict[str, int] = {}
    items: list[Layer | Shared] = []
    for token in tokens(tree):
        if isinstance(token, Layer):
            items.append(token)
        elif isinstance(token.sets, str):
            items.append(Shared(token.symbol, token.sets))
        else:
            calls[token.symbol] = calls.get(token.symbol, 0) + 1
            items.append(Shared(token.symbol, (calls[token.symbol] - 1) % token.sets))
    return tuple(items)
