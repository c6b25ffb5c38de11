"""The layout DSL's parser: recursive descent from a layout string to a tree of `hybrids.layout_tile` nodes.

`hybrids.layout.parse_layout` is the entry point; the grammar is in that module's docstring.
"""

from __future__ import annotations

import re

from blocks import registry
from hybrids.layout import (
    _COUNT,
    _NAME,
    _NO_LAYER,
    _SYMBOL,
    MAX_ITEMS,
    MAX_NESTING,
    LayoutError,
    _choices,
    _star_conflict,
)
from hybrids.layout_tile import Group, Layer, Node, Parallel, Run, Star, n_layers, size


class Parser:
    """Recursive descent over `text`; `pos` is the index of the next unread character."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0
        self.stars: dict[str, Star] = {}  # first star of each symbol, to check later ones against

    def parse(self) -> tuple[Node, ...]:
        tree = self.sequence(nesting=0, open_pos=None)
        if n_layers(tree) == 0:
            raise LayoutError(_NO_LAYER, self.text)  # before tiling, which needs a layer per period
        return tree

    def sequence(self, nesting: int, open_pos: int | None) -> tuple[Node, ...]:
        """Items separated by ':', up to the end (top level) or to the ')' closing `open_pos`."""
        nodes: list[Node] = []
        total = 0
        while True:
            start = self.pos
            nodes.append(self.item(nesting))
            total += size(nodes[-1:])
            if total > MAX_ITEMS:
                raise self.error(f"the layout expands to more than {MAX_ITEMS} blocks", start)
            self.skip_space()
            if self.peek() != ":":
                break
            self.pos += 1
        if open_pos is None and self.peek() == ")":
            raise self.error("unmatched ')'")
        if open_pos is not None and not self.peek():
            raise self.error("unclosed '('", open_pos)
        end = ")" if open_pos is not None else ""
        if self.peek() != end:
            expected = "':' or ')'" if end else "':' or the end of the layout"
            after_run = self.peek() == "x" and isinstance(nodes[-1], Run)
            hint = "; only a group '(...)' takes a repeat 'xN'" if after_run else ""
            if after_run and isinstance(nodes[-1].token, Layer) and isinstance(nodes[-1].token.mixer, Parallel):
                hint = f"; a parallel layer repeats with a count in front, as in '2{nodes[-1].token}'"
            raise self.error(f"expected {expected} but {self.found()}{hint}")
        return tuple(nodes)

    def item(self, nesting: int) -> Node:
        self.skip_space()
        if self.peek() != "(" or self.parallel_ahead():
            count_pos = self.pos
            count = self.count("a count") if _COUNT.match(self.text, self.pos) else 1
            node: Node = Run(self.token(self.text[count_pos : self.pos]), count)
        else:
            if nesting == MAX_NESTING:
                raise self.error(f"groups nest deeper than {MAX_NESTING} levels")
            open_pos = self.pos
            self.pos += 1
            body = self.sequence(nesting + 1, open_pos)
            self.pos += 1  # the ')' that sequence() found
            self.skip_space()
            count_pos = self.pos
            if self.peek() == "x":
                self.pos += 1
                self.skip_space()
                count_pos = self.pos
                node = Group(body, self.count("a repeat count after 'x'"))
            elif digits := _COUNT.match(self.text, self.pos):
                raise self.error(f"expected 'x' before the repeat count, as in ')x{digits.group()}'")
            else:
                node = Group(body, 1)
        if size((node,)) > MAX_ITEMS:
            raise self.error(f"the layout expands to more than {MAX_ITEMS} blocks", count_pos)
        return node

    def token(self, count: str) -> Layer | Star:
        """The token after an optional `count` (its text, "" when none was written)."""
        start = self.pos
        if self.peek() == "(":
            if not self.parallel_ahead():
                raise self.error(f"a group's repeat count goes after it, as in '(...)x{count}'")
            symbol, kind = self.parallel(), "mixer"
        else:
            symbol = self.symbol(f"a block symbol after the count {count!r}" if count
                                 else f"a block symbol ({_choices()}) or '('")
            kind = registry.get(symbol).kind
        if kind == "parallel":
            raise self.error(f"{symbol!r} is the parallel layer; write its branches in parentheses, "
                             "as in '(A|M2)'", start)
        if self.peek() == "*":
            return self.star(symbol, start)
        if kind == "shared":
            raise self.error(f"{symbol!r} is a shared block; write it with a star: '{symbol}*'", start)
        self.skip_space()
        if self.peek() != "+":
            return Layer(symbol, None) if kind == "mixer" else Layer(None, symbol)
        if kind == "mlp":
            raise self.error(f"{symbol!r} is an mlp block and cannot come first in a layer; "
                             "write the mixer first", start)
        self.pos += 1
        self.skip_space()
        mlp_pos = self.pos
        mlp = self.symbol(f"an mlp block symbol ({_choices('mlp')}) after '+'")
        if (mlp_kind := registry.get(mlp).kind) != "mlp":
            raise self.error(f"{mlp!r} is a {mlp_kind} block; '+' must be followed by an mlp block "
                             f"({_choices('mlp')})", mlp_pos)
        if self.peek() == "*":
            raise self.error("the mlp of a layer cannot be shared; write a shared block as its own item")
        return Layer(symbol, mlp)

    def parallel_ahead(self) -> bool:
        """Whether the '(' at `pos` opens a parallel layer "(A|M2)" rather than a group "(A:M2)"."""
        match = re.compile(r"\(\s*[A-Z][0-9]*\s*\|").match(self.text, self.pos)
        return match is not None

    def parallel(self) -> Parallel:
        """'(' symbol '|' symbol ... ')': the branches of a parallel layer, each a mixer."""
        open_pos = self.pos
        self.pos += 1
        branches = []
        while True:
            self.skip_space()
            pos = self.pos
            symbol = self.symbol(f"a mixer symbol ({_choices('mixer')})")
            if (kind := registry.get(symbol).kind) != "mixer":
                raise self.error(f"{symbol!r} is a block of kind {kind!r}; the branches of a parallel layer are "
                                 f"mixers ({_choices('mixer')})", pos)
            branches.append(symbol)
            self.skip_space()
            if self.peek() == ")":
                self.pos += 1
                return Parallel(tuple(branches))
            if self.peek() == "|":
                self.pos += 1
                continue
            if not self.peek():
                raise self.error("unclosed '('", open_pos)
            hint = {"*": "; share the whole layer instead, as in '(A|M2)*'",
                    "+": "; the mlp follows the parentheses, as in '(A|M2)+F'"}.get(self.peek(), "")
            raise self.error(f"expected '|' or ')' in a parallel layer but {self.found()}{hint}")

    def star(self, symbol: str | Parallel, start: int) -> Star:
        self.pos += 1
        name = self.take(_NAME)
        if name:
            star = Star(symbol, name)
        elif _COUNT.match(self.text, self.pos):
            star = Star(symbol, self.count("a count"))
        else:
            star = Star(symbol)
        if conflict := _star_conflict(self.stars, star):
            raise self.error(conflict, start)
        self.skip_space()
        if self.peek() == "+":
            plus = self.pos
            self.pos += 1
            self.skip_space()
            raise self.error(f"a shared block cannot carry an MLP: '{star}+{self.take(_SYMBOL)}'", plus)
        return star

    def symbol(self, expected: str) -> str:
        start = self.pos
        symbol = self.take(_SYMBOL)
        if not symbol:
            raise self.error(f"expected {expected} but {self.found()}")
        if symbol not in registry.symbols():
            raise self.error(f"unknown block symbol {symbol!r}; valid: {registry.describe()}", start)
        return symbol

    def count(self, expected: str) -> int:
        start = self.pos
        digits = self.take(_COUNT)
        if not digits:
            raise self.error(f"expected {expected} but {self.found()}")
        if len(digits) > 1 and digits[0] == "0":
            raise self.error(f"a count cannot have leading zeros: {digits!r}", start)
        # Checking the length first keeps int() away from huge digit strings (Python caps their conversion).
        if len(digits) > len(str(MAX_ITEMS)) or int(digits) > MAX_ITEMS:
            raise self.error(f"count is too large (at most {MAX_ITEMS})", start)
        if digits == "0":
            raise self.error("count must be >= 1", start)
        return int(digits)

    def peek(self) -> str:
        return self.text[self.pos : self.pos + 1]

    def skip_space(self) -> None:
        while self.peek().isspace():
            self.pos += 1

    def take(self, pattern: re.Pattern[str]) -> str:
        match = pattern.match(self.text, self.pos)
        if not match:
            return ""
        self.pos = match.end()
        return match.group()

    def found(self) -> str:
        return f"found {self.peek()!r}" if self.peek() else "found the end of the layout"

    def error(self, reason: str, pos: int | None = None) -> LayoutError:
        return LayoutError(reason, self.text, self.pos if pos is None else pos)
