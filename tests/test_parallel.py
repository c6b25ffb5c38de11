"""The parallel layer "(A|M2)": Hymba's combination, step decoding = parallel forward, weight sharing, accounting,
layout round trips and errors, and the hymba recipes (parameter count, a short CPU training run)."""

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blocks import ConfigError, registry
from blocks.base import Block, BlockConfig
from blocks.parallel import Parallel, ParallelConfig
from hybrids.accounting import stats
from hybrids.cli import main
from hybrids.layout import Group, Layer, Layout, LayoutError, Run, Star, parse_layout
from hybrids.layout import Parallel as ParallelSpec
from hybrids.model import build
from hybrids.training.run import train
from tests.inputs import max_rel
from tests.test_train import config, metric_rows

pytestmark = pytest.mark.usefixtures("one_thread")
D = 16
# Every branch 32 wide before its projection: attention 4 heads x v_head_dim 8, Mamba and Mamba2 expand 2 x 16.
SMALL = {"blocks.attention.n_heads": 4, "blocks.attention.v_head_dim": 8,
         "blocks.sliding_attention.n_heads": 4, "blocks.sliding_attention.v_head_dim": 8,
         "blocks.sliding_attention.window": 3, "blocks.mamba.d_state": 4,
         "blocks.mamba2.headdim": 8, "blocks.mamba2.d_state": 8, "blocks.mamba2.chunk_size": 4}


def small(layout, **overrides):
    model = build(layout, d_model=D, vocab_size=32, backend="torch", **{**SMALL, **overrides}).double()
    with torch.no_grad():  # off the initial values (norm weights start at one, LoRA-like zeros nowhere)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_output_is_the_projected_mean_of_the_rms_normed_branches_scaled_by_betas():
    layer = small("(A|M2)").layers[0].mixer
    assert isinstance(layer, Parallel) and [b.symbol for b in layer.branches] == ["A", "M2"]
    attn, mamba2 = layer.branches
    assert attn.o_proj is None and mamba2.out_proj is None  # one projection for both, as Hymba's out_proj
    assert tuple(layer.out_proj.weight.shape) == (D, 32)
    x = torch.randn(2, 9, D, dtype=torch.float64)

    def rms(y):  # in fp32, as blocks.norm.RMSNorm computes
        y32 = y.float()
        return (y32 * torch.rsqrt(y32.pow(2).mean(-1, keepdim=True) + 1e-6)).double()

    betas = [norm.weight for norm in layer.norms]
    expected = layer.out_proj((betas[0] * rms(attn(x)) + betas[1] * rms(mamba2(x))) / 2)
    assert max_rel(layer(x), expected) < 1e-12


@pytest.mark.parametrize("layout, overrides", [
    ("(A|M2)+F:M2", {}),
    ("(W|M|M2)+F:(W|M)", {}),  # three branches; windows of 3 keys, shorter than the sequence
    ("(A|M2):M", {"blocks.parallel.project": "branch", "blocks.attention.v_head_dim": None}),  # widths 16 and 32
])
def test_step_by_step_decoding_equals_the_parallel_forward(layout, overrides):
    model = small(layout, **overrides)
    ids = torch.randint(0, 32, (2, 13))
    cache = model.allocate_cache(2, 13, dtype=torch.float64)
    logits = [model(ids[:, :4], cache)] + [model(ids[:, t : t + 1], cache, step=True) for t in range(4, 13)]
    assert max_rel(torch.cat(logits, 1), model(ids)) < 1e-10


def test_branch_projection_keeps_each_branchs_own_and_adds_none():
    layer = small("(A|M2)", **{"blocks.parallel.project": "branch"}).layers[0].mixer
    assert layer.out_proj is None and layer.branches[0].o_proj is not None and layer.branches[1].out_proj is not None
    assert [norm.weight.numel() for norm in layer.norms] == [D, D]


def test_a_shared_parallel_layer_is_one_weight_set_for_every_occurrence():
    model = small("(A|M2)*:M2:(A|M2)*:M2")
    assert list(model.shared) == ["(A|M2)_0"] and [p[0] for p in model.plan].count("shared_layer") == 2
    shared = model.shared["(A|M2)_0"]
    model(torch.randint(0, 32, (2, 7))).sum().backward()
    assert shared.mixer.out_proj.weight.grad.abs().sum() > 0
    s = stats(model, seq_len=7)
    assert s.params_unique == n_params(model)
    assert s.params_per_invocation == s.params_unique + n_params(shared)
    assert s.flops_breakdown["shared"] == 2 * (shared.mixer.flops_per_token(7))
    named = small("(A|M2)*x:M2:(A|M2)*y:M2")
    a, b = named.shared["(A|M2)_x"], named.shared["(A|M2)_y"]
    assert a.mixer.out_proj.weight is not b.mixer.out_proj.weight
    assert stats(named, seq_len=7).params_unique == n_params(named) == s.params_unique + n_params(a)


def test_accounting_sums_the_branches_and_the_cache_bytes_measured_equal_accounted():
    model = small("(W|M2)+F:(A|M)")
    first, second = model.layers[0].mixer, model.layers[1].mixer
    s = stats(model, seq_len=10, batch=3, dtype=torch.bfloat16)
    assert s.params_unique == n_params(model)
    w, m2 = first.branches
    assert first.flops_per_token(10) == w.flops_per_token(10) + m2.flops_per_token(10) + 2 * 32 * D
    assert s.flops_breakdown["parallel"] == first.flops_per_token(10) + second.flops_per_token(10)
    cache = model.allocate_cache(3, 10, dtype=torch.bfloat16)
    assert cache.nbytes() == {"kv": s.kv_cache_bytes, "state": s.state_bytes}
    # KV: the windowed branch holds 3 positions, the full one 10; 2 x 4 heads x 4 key + 8 value channels x 2 bytes
    assert s.kv_cache_bytes == 3 * (3 + 10) * 4 * (4 + 8) * 2
    assert s.state_bytes == sum(b.cache_bytes(3, 10, torch.bfloat16)["state"] for b in [m2, *second.branches])


@pytest.mark.parametrize("text, canonical", [
    ("(A|M2)", "(A|M2)"),
    (" ( A | M2 ) + F : M ", "(A|M2)+F:M"),
    ("(W|M):(W|M):(W|M)", "3(W|M)"),
    ("((W|M)+F)x3", "3(W|M)+F"),
    ("((A|M2):M)x2:(A|M2)*2", "((A|M2):M)x2:(A|M2)*2"),
    ("(A|M)+F:14(W|M)+F:(A|M)+F:15(W|M)+F:(A|M)+F", "(A|M)+F:14(W|M)+F:(A|M)+F:15(W|M)+F:(A|M)+F"),
    ("(A|M2)*x:M:(A|M2)*y", "(A|M2)*x:M:(A|M2)*y"),
    ("(M2|A)", "(M2|A)"),  # branch order is kept
])
def test_parse_and_print_round_trip(text, canonical):
    layout = parse_layout(text)
    assert str(layout) == canonical and parse_layout(canonical) == layout


def test_tokens_and_depth_tiling():
    layout = parse_layout("(A|M2)+F:2M", depth=7)
    assert str(layout) == "((A|M2)+F:2M)x2:(A|M2)+F"
    assert layout.items[0] == Layer(ParallelSpec(("A", "M2")), "F")
    assert parse_layout("(A|M2)*:M").items[0].symbol == ParallelSpec(("A", "M2"))
    assert parse_layout("(A|M)+F:2(W|M)+F").describe().splitlines()[1:] == [
        "layer 0: (A|M)+F", "layer 1: (W|M)+F", "layer 2: (W|M)+F"]


MIXERS = ["M", "M2", "A", "W"]
parallels = st.lists(st.sampled_from(MIXERS), min_size=2, max_size=3).map(lambda b: ParallelSpec(tuple(b)))
mixers = st.sampled_from(MIXERS) | parallels
tokens = (st.builds(Layer, mixers, st.none() | st.just("F"))
          | parallels.map(Star) | parallels.map(lambda p: Star(p, 2)))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.builds(Run, tokens, st.integers(1, 3)) | st.builds(
    Group, st.lists(st.builds(Run, tokens, st.integers(1, 3)), min_size=1, max_size=3).map(tuple),
    st.integers(1, 3)), min_size=1, max_size=4))
def test_random_layouts_with_parallel_layers_round_trip(nodes):
    try:
        layout = Layout((Run(Layer("M", None)), *nodes))
    except LayoutError as error:  # a parallel layer starred both alone and round-robin: one form per symbol
        assert "use one count per symbol" in error.reason
        return
    text = str(layout)
    assert parse_layout(text) == layout
    assert parse_layout(text.replace("|", " | ").replace(":", " : ")) == layout


@pytest.mark.parametrize("text, reason, column", [
    ("(A|F)", "'F' is a block of kind 'mlp'; the branches of a parallel layer are mixers "
              "(one of M, M2, A, W, G, H)", 3),
    ("M:(A|S)", "'S' is a block of kind 'shared'; the branches of a parallel layer are mixers "
                "(one of M, M2, A, W, G, H)", 5),
    ("(A|", "expected a mixer symbol (one of M, M2, A, W, G, H) but found the end of the layout", 3),
    ("(A||M)", "expected a mixer symbol (one of M, M2, A, W, G, H) but found '|'", 3),
    ("M:(A|M2", "unclosed '('", 2),
    ("(A|M2*)", "expected '|' or ')' in a parallel layer but found '*'; share the whole layer instead, "
                "as in '(A|M2)*'", 5),
    ("(A|M2+F)", "expected '|' or ')' in a parallel layer but found '+'; the mlp follows the parentheses, "
                 "as in '(A|M2)+F'", 5),
    ("(A|M2:M)", "expected '|' or ')' in a parallel layer but found ':'", 5),
    ("(A|M2)x2", "expected ':' or the end of the layout but found 'x'; a parallel layer repeats with a count in "
                 "front, as in '2(A|M2)'", 6),
    ("(A|Q)", "unknown block symbol 'Q'; valid: " + registry.describe(), 3),
    ("M:P", "'P' is the parallel layer; write its branches in parentheses, as in '(A|M2)'", 2),
    ("(A|M2)+A", "'A' is a mixer block; '+' must be followed by an mlp block (one of F, E)", 7),
])
def test_bad_parallel_syntax_is_one_message_with_a_caret(text, reason, column):
    with pytest.raises(LayoutError) as err:
        parse_layout(text)
    assert err.value.reason == reason and err.value.pos == column
    assert str(err.value).splitlines()[2] == "  " + " " * column + "^"


def test_unequal_branch_widths_and_a_global_out_proj_are_one_line_errors(capsys):
    message = ("parallel layer (A|M2): one output projection needs equally wide branch outputs, got A 16, M2 32; "
               "make them equal (e.g. blocks.attention.v_head_dim) or set blocks.parallel.project=branch")
    with pytest.raises(ConfigError) as err:
        build("(A|M2)", d_model=D, **{"blocks.attention.n_heads": 4, "blocks.mamba2.headdim": 8})
    assert str(err.value) == message
    assert main(["info", "(A|M2)", "--set", "d_model=16", "--set", "blocks.attention.n_heads=4",
                 "--set", "blocks.mamba2.headdim=8"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"hybrids: error: {message}"]
    with pytest.raises(ConfigError, match=r"^blocks.mamba.out_proj is not a model option"):
        build("(A|M)", **{"blocks.mamba.out_proj": False})
    with pytest.raises(ConfigError, match="^parallel: project must be one of shared, branch, got 'both'$"):
        ParallelConfig(d_model=D, project="both")


@dataclass
class _PlainConfig(BlockConfig):
    pass


def test_a_mixer_without_an_out_proj_option_joins_only_with_its_own_projection():
    registry.register("plain_mixer", "Z7", _PlainConfig, "mixer")(type("Plain", (Block,), {}))
    try:
        with pytest.raises(ConfigError, match=r"^parallel layer: plain_mixer \(Z7\) cannot leave out its output "
                                              r"projection to share one; set blocks.parallel.project=branch$"):
            build("(A|Z7)", d_model=D, device="meta")
    finally:
        registry.unregister("plain_mixer")


HYMBA_RELEASED = 1_522_797_824  # Hymba-1.5B-Base (NVlabs' modeling_hymba.py on its config)


def test_hymba_recipe_follows_hymba_1_5b():
    model = build("hymba", device="meta")
    ours = n_params(model)
    assert ours == 1_545_633_024
    # The released count differs by exactly what the layout cannot express: 15 of the 32 layers reuse the
    # previous layer's keys and values (no k/v projections: 1600 x (320 + 640) each), and 128 meta tokens.
    assert ours - 15 * 1600 * (320 + 640) + 128 * 1600 == HYMBA_RELEASED
    windows = [layer.mixer.branches[0].config.window for layer in model.layers]
    assert [i for i, w in enumerate(windows) if w is None] == [0, 15, 31] and set(windows) == {None, 1024}
    assert {layer.mixer.out_proj.in_features for layer in model.layers} == {3200}
    assert model.lm_head.weight is model.embed.weight


def test_hymba_tiny_learns_in_20_cpu_steps(tmp_path):
    result = train(config(tmp_path, "model=hymba-tiny", "trainer.max_steps=20", "trainer.val_every=100",
                          "optim.lr=3e-3"))
    assert result.steps == 20 and result.stop_reason is None
    loss = metric_rows(result.run_dir, "train/loss")
    first, last = sum(loss[s] for s in range(3)) / 3, sum(loss[s] for s in range(17, 20)) / 3
    assert last < first - 1.0, (first, last)  # 5.77 -> 3.87 on 2 CPU cores
