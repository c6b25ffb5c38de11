"""The layout DSL: parsing, canonical form, depth tiling, shared-set resolution and error messages."""

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import blocks  # noqa: F401  (registers the real blocks once they exist)
from blocks import registry
from hybrids.layout import Group, Layer, Layout, LayoutError, Run, Shared, Star, parse_layout
from hybrids.layout_tile import size, tokens

ZAMBA_7B = "2M:A*:5M:A*:(6M:A*)x11:3M"
JAMBA = "(M+F:M+E:M+F:M+E:A+F:M+E:M+F:M+E)x4"
MIXERS, MLPS = ("M", "M2", "A"), ("F", "E")


@pytest.fixture(scope="module", autouse=True)
def layout_symbols():
    """Dummy blocks for the layout symbols that no real block has registered yet."""
    added = []
    for name, symbol, kind in [("mamba", "M", "mixer"), ("mamba2", "M2", "mixer"),
                               ("attention", "A", "mixer"), ("mlp", "F", "mlp"), ("moe", "E", "mlp")]:
        if symbol not in registry.symbols():
            registry.register(name, symbol, object, kind)(type(f"Dummy_{name}", (), {}))
            added.append(name)
    yield
    for name in added:
        registry.unregister(name)


def caret(error: LayoutError) -> int:
    """The column the caret points at, checking the message is reason / text / caret."""
    reason, shown, marker = str(error).split("\n")
    assert reason == error.reason and marker.strip() == "^" and shown.startswith("  ")
    return marker.index("^") - 2


def slots(layout: Layout) -> list:
    return [shared.slot for _, shared in layout.invocations]


def test_zamba_7b_exact_layout():
    layout = parse_layout(ZAMBA_7B)
    assert layout.n_layers == 76
    assert layout.invocation_layers == (2, 7, *range(13, 74, 6))
    assert len(layout.invocations) == 13
    assert layout.invocations[0] == (2, Shared("A", 0)) and layout.invocations[1] == (8, Shared("A", 0))
    assert layout.shared_sets == (("A", 0),)
    assert str(layout) == ZAMBA_7B and parse_layout(ZAMBA_7B, depth=76) == layout


@pytest.mark.parametrize(
    "text, depth, canonical",
    [
        ("6M:A*", 78, "(6M:A*)x12:6M"),
        ("6M:A*", 14, "(6M:A*)x2:2M"),
        ("6M:A*", 7, "6M:A*:M"),
        ("6M:A*", 6, "6M"),
        ("6M:A*", 3, "3M"),
        ("A*:3M", 7, "(A*:3M)x2:A*:M"),
        ("(6M:A*)x13", 78, "(6M:A*)x12:6M"),
        ("(6M:A*)x13", 156, "(6M:A*)x25:6M"),
        ("12M", 5, "5M"),
        ("M+E:A+F", 5, "(M+E:A+F)x2:M+E"),
    ],
)
def test_depth_tiling_and_end_rule(text, depth, canonical):
    layout = parse_layout(text, depth=depth)
    assert str(layout) == canonical
    assert layout.n_layers == depth and isinstance(layout.items[-1], Layer)
    assert parse_layout(canonical) == layout


def test_depth_78_places_12_invocations():
    layout = parse_layout("6M:A*", depth=78)
    assert len(layout.items) == 90 and len(layout.invocations) == 12
    assert layout.invocation_layers == tuple(range(6, 73, 6))


def test_without_depth_a_trailing_invocation_stays():
    layout = parse_layout("6M:A*")
    assert layout.n_layers == 6 and layout.items[-1] == Shared("A", 0) and layout.invocation_layers == (6,)


def test_round_robin_alternates_over_the_whole_layout():
    layout = parse_layout("(3M:A*2)x4")
    assert slots(layout) == [0, 1, 0, 1] and layout.invocation_layers == (3, 6, 9, 12)
    assert layout.shared_sets == (("A", 0), ("A", 1))
    assert slots(parse_layout("M:A*3:(2M:A*3:M:2A*3)x2")) == [0, 1, 2, 0, 1, 2, 0]
    assert slots(parse_layout("6M:A*2", depth=24)) == [0, 1, 0]
    two_symbols = parse_layout("M:A*2:M:M2*:M:A*2:M")
    assert two_symbols.invocations == [(1, Shared("A", 0)), (3, Shared("M2", 0)), (5, Shared("A", 1))]


def test_named_sets():
    layout = parse_layout("6M:A*x:6M:A*y:6M:A*x")
    assert slots(layout) == ["x", "y", "x"] and layout.invocation_layers == (6, 12, 18)
    assert layout.shared_sets == (("A", "x"), ("A", "y"))
    assert slots(parse_layout("M:A*x2:M:A*z_1:M")) == ["x2", "z_1"]


def test_consecutive_invocations():
    layout = parse_layout("M:2A*2:M")
    assert slots(layout) == [0, 1] and layout.invocation_layers == (1, 1) and layout.n_layers == 2


def test_jamba_layers():
    layout = parse_layout(JAMBA)
    assert str(layout) == JAMBA and layout.n_layers == 32 and layout.invocations == []
    assert [i for i, layer in enumerate(layout.items) if layer.mixer == "A"] == [4, 12, 20, 28]
    assert [layer.mlp for layer in layout.items[:8]] == ["F", "E"] * 4
    assert layout.items[1] == Layer("M", "E") and str(layout.items[4]) == "A+F"


@pytest.mark.parametrize(
    "text, canonical",
    [
        (" 6M : A* ", "6M:A*"),
        ("M:M:M", "3M"),
        ("(6M:A*)x1", "6M:A*"),
        ("(6M:A*)", "6M:A*"),
        ("( 6M:A* ) x 2", "(6M:A*)x2"),
        ("(M)x3:M", "4M"),
        ("(M:M)x2", "4M"),
        ("((6M:A*)x2)x3", "(6M:A*)x6"),
        ("M:(M:A*)", "2M:A*"),
        ("A*1:M", "A*:M"),
        ("M + F:M+F:3M+F", "5M+F"),
        ("A*:A*:M", "2A*:M"),
        ("(M:A*)x2:(M:A*)x3", "(M:A*)x5"),
        ("(M:A*)x2:(M:A*)", "(M:A*)x2:M:A*"),
        ("F:F", "2F"),
        ("\t2M2:E\n", "2M2:E"),
    ],
)
def test_canonical_form(text, canonical):
    layout = parse_layout(text)
    assert str(layout) == canonical and parse_layout(canonical) == layout


def test_equality_and_hash_by_value():
    a, b = parse_layout("M:M"), parse_layout("2M")
    assert a == b == Layout((Run(Layer("M", None), 2),)) and hash(a) == hash(b) and len({a, b}) == 1
    grouped, flat = parse_layout("(M:A*)x2"), parse_layout("M:A*:M:A*")
    assert grouped != flat and grouped.items == flat.items  # groups stay as written
    assert repr(grouped) == "Layout('(M:A*)x2')"


def test_describe():
    assert parse_layout("2M:A*:F:A*").describe().splitlines() == [
        "2M:A*:F:A*: 3 layers, 2 shared invocations, shared weight sets: A*[0]",
        "layer 0: M",
        "layer 1: M",
        "layer 2: F  <- A*[0] invocation 0",
        "after layer 2: A*[0] invocation 1 (no later layer consumes it)",
    ]
    assert parse_layout("M:A*x:M+E").describe().splitlines()[2] == "layer 1: M+E  <- A*x invocation 0"


@pytest.mark.parametrize(
    "text, fragment, column",
    [
        ("", "expected a block symbol (one of ", 0),
        ("6M:%", "or '(' but found '%'", 3),
        ("m", "or '(' but found 'm'", 0),
        ("6M:Q", "unknown block symbol 'Q'; valid: ", 3),
        ("(6M:A*", "unclosed '('", 0),
        ("6M:(M:(A*)x2", "unclosed '('", 3),
        ("6M)", "unmatched ')'", 2),
        ("0M", "count must be >= 1", 0),
        ("06M", "a count cannot have leading zeros: '06'", 0),
        ("(M)x0", "count must be >= 1", 4),
        ("(M)x", "expected a repeat count after 'x' but found the end of the layout", 4),
        ("1000000M", "count is too large", 0),
        ("E+M", "'E' is an mlp block and cannot come first in a layer", 0),
        ("M:A*+F", "a shared block cannot carry an MLP: 'A*+F'", 4),
        ("M+M", "'M' is a mixer block; '+' must be followed by an mlp block", 2),
        ("M+", "expected an mlp block symbol (one of ", 2),
        ("M+F*", "the mlp of a layer cannot be shared", 3),
        ("6M:", "but found the end of the layout", 3),
        ("6M::A*", "but found ':'", 3),
        ("6Mx2", "only a group '(...)' takes a repeat 'xN'", 2),
        ("6 M", "expected a block symbol after the count '6' but found ' '", 1),
        ("6(M)", "a group's repeat count goes after it, as in '(...)x6'", 1),
        ("(M:A*)13", "expected 'x' before the repeat count, as in ')x13'", 6),
        ("6M A*", "expected ':' or the end of the layout but found 'A'", 3),
        ("(M A*)", "expected ':' or ')' but found 'A'", 3),
        ("M:A*2:M:A*3", "'A*3' gives shared block 'A' 3 weight sets but 'A*2' gave it 2", 8),
        ("M:A*:M:A*2", "'A*2' gives shared block 'A' 2 weight sets but 'A*' gave it 1", 7),
        ("M:A*2:M:A*x", "shared block 'A' is used both round-robin and with named sets", 8),
        ("(" * 40 + "M" + ")" * 40, "groups nest deeper than 32 levels", 32),
        ("(((M)x99)x99)x99", "the layout expands to more than 100000 blocks", 14),
        ("99999M:99999M", "the layout expands to more than 100000 blocks", 7),
        ("M\n:%", "but found '%'", 3),
    ],
)
def test_error_points_at_the_offending_character(text, fragment, column):
    with pytest.raises(LayoutError) as info:
        parse_layout(text)
    assert fragment in info.value.reason
    assert caret(info.value) == column == info.value.pos


def test_error_message_layout():
    with pytest.raises(LayoutError) as info:
        parse_layout("6M:A*)")
    assert str(info.value) == "unmatched ')'\n  6M:A*)\n       ^"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "text, depth, fragment",
    [
        ("A*", None, "the layout has no backbone layer"),
        ("2A*x:A*y", 12, "the layout has no backbone layer"),
        ("6M:A*", 0, "depth must be an integer from 1 to 100000, got 0"),
        ("6M:A*", True, "depth must be an integer"),
        ("6M:A*", 10**6, "depth must be an integer"),
        ("M:99990A*", 3, "the layout expands to 199983 blocks"),
    ],
)
def test_errors_about_the_whole_layout(text, depth, fragment):
    with pytest.raises(LayoutError) as info:
        parse_layout(text, depth=depth)
    assert fragment in info.value.reason and info.value.pos is None


def test_symbols_come_from_the_registry():
    assert "Z" not in registry.symbols()
    with pytest.raises(LayoutError, match="unknown block symbol 'Z'"):
        parse_layout("6M:Z*")
    registry.register("test_shared", "Z", object, "shared")(type("SharedBlock", (), {}))
    try:
        assert parse_layout("6M:Z*").items[-1] == Shared("Z", 0)
        with pytest.raises(LayoutError, match="'Z' is a shared block; write it with a star: 'Z\\*'"):
            parse_layout("6M:Z")
    finally:
        registry.unregister("test_shared")


@pytest.mark.parametrize(
    "tree, fragment",
    [
        ((Run(Layer("E", "M")),), "'E' is not a mixer block"),
        ((Run(Layer(None, None)),), "a layer needs a mixer or an mlp block"),
        ((Run(Star("A", 0)), Run(Layer("M", None))), "needs >= 1 weight sets"),
        ((Run(Star("A", "X")), Run(Layer("M", None))), "a weight-set name must match"),
        ((Group((Run(Layer("M", None)),), 0),), "count must be an integer >= 1, got 0"),
        ((Run(Star("A", 2)), Run(Layer("M", None)), Run(Star("A"))), "'A*' gives shared block 'A' 1"),
        ((Run(Star("A")),), "the layout has no backbone layer"),
    ],
)
def test_layout_from_tree_is_validated(tree, fragment):
    with pytest.raises(LayoutError, match=fragment.replace("*", "\\*")):
        Layout(tree)


@st.composite
def trees(draw):
    """Valid layout trees: each shared symbol keeps one form (round-robin count or named sets)."""
    plans = {symbol: draw(st.sampled_from([1, 2, 3, "named"])) for symbol in ("A", "M2")}
    stars = [st.sampled_from(["x", "y", "z_1"]).map(lambda name, s=s: Star(s, name)) if plan == "named"
             else st.just(Star(s, plan)) for s, plan in plans.items()]
    layers = st.builds(Layer, st.sampled_from(MIXERS), st.none() | st.sampled_from(MLPS)) | st.builds(
        Layer, st.none(), st.sampled_from(MLPS))
    runs = st.builds(Run, st.one_of(layers, *stars), st.integers(1, 5))
    nodes = st.recursive(
        runs, lambda inner: st.builds(Group, st.lists(inner, min_size=1, max_size=4).map(tuple),
                                      st.integers(1, 3)), max_leaves=8)
    tree = draw(st.lists(nodes, min_size=1, max_size=5))
    tree.insert(draw(st.integers(0, len(tree))), Run(draw(layers)))  # at least one backbone layer
    assume(size(tuple(tree)) <= 2000)
    return tuple(tree)


@settings(max_examples=150, deadline=None)
@given(trees())
def test_round_trip_of_random_trees(tree):
    layout = Layout(tree)
    text = str(layout)
    assert list(tokens(layout.tree)) == list(tokens(tree))  # normalizing keeps the expanded sequence
    assert parse_layout(text) == layout and str(parse_layout(text)) == text
    spaced = text.replace(":", " : ").replace("(", " ( ").replace(")x", " ) x ").replace("+", " + ")
    assert parse_layout(spaced) == layout


@settings(max_examples=100, deadline=None)
@given(trees(), st.integers(1, 60))
def test_tiling_is_a_prefix_of_the_repeated_period(tree, depth):
    period = Layout(tree)
    repeats = -(-depth // period.n_layers)
    assume(len(period.items) * repeats <= 20_000)
    tiled = parse_layout(str(period), depth=depth)
    assert tiled.n_layers == depth and isinstance(tiled.items[-1], Layer)
    assert parse_layout(str(tiled)) == tiled
    repeated = parse_layout(f"({period})x{repeats}")
    layer_positions = [i for i, item in enumerate(repeated.items) if isinstance(item, Layer)]
    assert tiled.items == repeated.items[: layer_positions[depth - 1] + 1]


FRAGMENTS = ["M", "M2", "A", "F", "E", "A*", "*", "*2", "*x", "2", "0", "(", ")", ")x2", "x", ":", "+", " ", "Q"]
texts = (st.text("MAFE2x*():+ 0123456789yzQm%_\t", max_size=40)
         | st.lists(st.sampled_from(FRAGMENTS), max_size=20).map("".join) | st.text(max_size=15))


@settings(max_examples=400, deadline=None)
@given(texts, st.none() | st.integers(-2, 40))
def test_any_string_parses_or_raises_layout_error(text, depth):
    try:
        layout = parse_layout(text, depth=depth)
    except LayoutError as error:
        assert error.pos is None or 0 <= error.pos <= len(text)
        if error.pos is not None:
            assert caret(error) == error.pos
    else:
        assert parse_layout(str(layout)) == layout and layout.n_layers >= 1
