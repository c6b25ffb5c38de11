"""The layout tree: its nodes, its normal form, and tiling a period to a depth.

A parsed layout string is a tuple of nodes: a `Run` repeats one token (a backbone `Layer` or a shared-block
`Star`), a `Group` repeats a sub-sequence. `hybrids.layout` parses text into this tree and resolves it into
items; this module only reshapes trees and never looks at the block registry.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import repeat as repeat_item


@dataclass(frozen=True)
class Parallel:
    """Mixers side by side in one layer over the same input, "(A|M2)" (see `blocks.parallel`).

    Args:
        branches: symbols of "mixer" blocks, at least two, in written order.
    """

    branches: tuple[str, ...]

    def __str__(self) -> str:
        return f"({'|'.join(self.branches)})"


@dataclass(frozen=True)
class Layer:
    """One backbone layer: a sequence mixer, an MLP, or a mixer followed by an MLP ("M+E").

    Args:
        mixer: symbol of a "mixer" block, a `Parallel` of them, or None for an MLP-only layer.
        mlp: symbol of an "mlp" block, or None for a mixer-only layer.
    """

    mixer: str | Parallel | None
    mlp: str | None

    def __str__(self) -> str:
        return "+".join(str(symbol) for symbol in (self.mixer, self.mlp) if symbol)


@dataclass(frozen=True)
class Star:
    """A shared-block token as written: "A*" (sets=1), "A*2" (sets=2, round-robin) or "A*x" (sets="x").

    Args:
        symbol: the block's registry symbol, or a `Parallel` layer ("(A|M2)*").
        sets: how many weight sets the invocations rotate through, or the name of the one set used.
    """

    symbol: str | Parallel
    sets: int | str = 1

    def __str__(self) -> str:
        return f"{self.symbol}*{'' if self.sets == 1 else self.sets}"


@dataclass(frozen=True)
class Run:
    """`count` consecutive copies of one token ("6M", "2A*")."""

    token: Layer | Star
    count: int = 1

    def __str__(self) -> str:
        return f"{self.count if self.count > 1 else ''}{self.token}"


@dataclass(frozen=True)
class Group:
    """A parenthesised sub-sequence repeated `repeat` times ("(6M:A*)x13")."""

    body: tuple[Node, ...]
    repeat: int = 1

    def __str__(self) -> str:
        return f"({format_tree(self.body)})x{self.repeat}"


Node = Run | Group


def format_tree(nodes: tuple[Node, ...]) -> str:
    """The layout text of a tree: its nodes joined by ':' (canonical when the tree is normalized)."""
    return ":".join(map(str, nodes))


def walk(nodes: tuple[Node, ...]) -> Iterator[Node]:
    """Every node of the tree, parents before children, in written order."""
    for node in nodes:
        yield node
        if isinstance(node, Group):
            yield from walk(node.body)


def tokens(nodes: tuple[Node, ...]) -> Iterator[Layer | Star]:
    """The tokens of the tree with every count and repeat expanded."""
    for node in nodes:
        if isinstance(node, Run):
            yield from repeat_item(node.token, node.count)
        else:
            for _ in range(node.repeat):
                yield from tokens(node.body)


def size(nodes: tuple[Node, ...]) -> int:
    """Number of expanded tokens (layers and shared invocations), computed without expanding."""
    return sum(node.count if isinstance(node, Run) else node.repeat * size(node.body) for node in nodes)


def n_layers(nodes: tuple[Node, ...]) -> int:
    """Number of expanded backbone layers (tokens that are not shared invocations)."""
    total = 0
    for node in nodes:
        if isinstance(node, Run):
            total += node.count if isinstance(node.token, Layer) else 0
        else:
            total += node.repeat * n_layers(node.body)
    return total


def normalize(nodes: tuple[Node, ...]) -> tuple[Node, ...]:
    """The canonical tree, built bottom-up.

    Rules: a group repeated once is replaced by its body; a group whose body is one node absorbs it
    ("(2M)x3" -> "6M", "((6M:A*)x2)x3" -> "(6M:A*)x6"); adjacent runs of one token or groups of one
    body merge ("M:M:M" -> "3M", "(M:A*)x2:(M:A*)x3" -> "(M:A*)x5"). Groups are otherwise kept as
    written: repetition is never searched for.

    Args:
        nodes: any tree.
    Returns:
        A tree with the same expanded tokens, on which `normalize` is the identity.
    """
    out: list[Node] = []
    for node in nodes:
        for piece in _simplify(node):
            _push(out, piece)
    return tuple(out)


def _simplify(node: Node) -> tuple[Node, ...]:
    if isinstance(node, Run):
        return (node,)
    body = normalize(node.body)
    if node.repeat == 1:
        return body
    if len(body) == 1:
        (only,) = body
        if isinstance(only, Run):
            return (Run(only.token, only.count * node.repeat),)
        return (Group(only.body, only.repeat * node.repeat),)
    return (Group(body, node.repeat),)


def _push(out: list[Node], node: Node) -> None:
    # Merging keeps the last node's token/body, so `out` never holds two mergeable neighbours.
    last = out[-1] if out else None
    if isinstance(last, Run) and isinstance(node, Run) and last.token == node.token:
        out[-1] = Run(node.token, last.count + node.count)
    elif isinstance(last, Group) and isinstance(node, Group) and last.body == node.body:
        out[-1] = Group(node.body, last.repeat + node.repeat)
    else:
        out.append(node)


def truncate(nodes: tuple[Node, ...], keep: int) -> tuple[Node, ...]:
    """The prefix of the tree that ends with its `keep`-th backbone layer.

    Shared invocations after that layer are dropped: an invocation's output feeds the next backbone
    layer, so one with no later layer has no consumer. A group that is cut keeps its whole repeats as
    a group and is followed by the cut prefix of one more repeat.

    Args:
        nodes: a tree with at least `keep` backbone layers.
        keep: number of backbone layers to keep, >= 1.
    Returns:
        The cut tree (not normalized).
    """
    out: list[Node] = []
    for node in nodes:
        if keep == 0:
            break
        if isinstance(node, Run):
            if isinstance(node.token, Star):
                out.append(node)  # keep > 0, so a later layer consumes these invocations
            else:
                out.append(Run(node.token, min(keep, node.count)))
                keep -= min(keep, node.count)
            continue
        per_repeat = n_layers(node.body)
        if per_repeat == 0 or keep > per_repeat * node.repeat:
            out.append(node)
            keep -= per_repeat * node.repeat
            continue
        whole = (keep - 1) // per_repeat  # repeats followed by at least one more kept layer
        if whole:
            out.append(Group(node.body, whole))
        out.extend(truncate(node.body, keep - whole * per_repeat))
        keep = 0
    return tuple(out)


def tile(period: tuple[Node, ...], depth: int) -> tuple[Node, ...]:
    """Repeat `period` and cut it after exactly `depth` backbone layers (see `truncate` for the cut).

    The whole repeats become one group: tile("6M:A*", 14) is "(6M:A*)x2:2M"; a period that already
    holds `depth` layers or more is only cut: tile("(6M:A*)x13", 78) is "(6M:A*)x12:6M".

    Args:
        period: a tree with at least one backbone layer.
        depth: number of backbone layers wanted, >= 1.
    Returns:
        The normalized tiled tree.
    """
    per_period = n_layers(period)
    periods = -(-depth // per_period)
    return normalize(truncate((Group(period, periods),), depth))
