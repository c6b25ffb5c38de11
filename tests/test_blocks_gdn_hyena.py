"""Gated DeltaNet and Hyena blocks: step vs parallel, cache bytes, FLOPs against FlopCounterMode, filters, errors."""

import pytest
import torch

from blocks import ConfigError
from blocks.gated_deltanet import GatedDeltaNet, GatedDeltaNetConfig
from blocks.hyena import Hyena, HyenaConfig
from blocks.ops.fft_conv import causal_conv_direct, fft_flops_per_token
from hybrids.accounting import stats
from hybrids.model import build
from tests.inputs import max_rel
from tests.test_accounting import counted_flops

D = 16
CASES = {
    "gdn": lambda: GatedDeltaNet(GatedDeltaNetConfig(d_model=D, n_heads=2, chunk_size=4)),
    "gdn_expand1_bias_headdim": lambda: GatedDeltaNet(GatedDeltaNetConfig(
        d_model=D, n_heads=3, head_dim=4, expand_v=1.5, conv_bias=True, d_conv=3, chunk_size=8)),
    "hyena": lambda: Hyena(HyenaConfig(d_model=D, l_max=32, filter_order=8)),
    "hyena_order3": lambda: Hyena(HyenaConfig(d_model=D, order=3, l_max=8, emb_dim=5, filter_order=8, d_conv=4)),
}


def _randomize(block):
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return block.double()


@pytest.mark.parametrize("name", list(CASES))
def test_step_by_step_equals_full_forward_after_prefill(name):
    block = _randomize(CASES[name]())
    length, prefill = 13, 5
    x = torch.randn(2, length, D, dtype=torch.float64)
    full = block(x)
    cache = block.allocate_cache(2, length, dtype=torch.float64)
    outs = [block(x[:, :prefill], cache)]
    outs += [block.step(x[:, t : t + 1], cache) for t in range(prefill, length)]
    assert full.shape == x.shape and full.abs().max() > 0.1
    assert max_rel(torch.cat(outs, 1), full) < 1e-10


@pytest.mark.parametrize("name", list(CASES))
def test_steps_from_an_empty_cache_equal_the_full_forward(name):
    block = _randomize(CASES[name]())
    x = torch.randn(1, 9, D, dtype=torch.float64)
    cache = block.allocate_cache(1, 9, dtype=torch.float64)
    steps = torch.cat([block.step(x[:, t : t + 1], cache) for t in range(9)], 1)
    assert max_rel(steps, block(x)) < 1e-10


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cache_bytes_equal_allocated_cache(name, dtype):
    block = CASES[name]()
    expected = block.cache_bytes(3, 20, dtype)
    assert block.allocate_cache(3, 20, dtype=dtype).nbytes() == expected["kv"] + expected["state"]
    assert expected["kv"] == 0


def test_model_cache_bytes_match_allocated_caches():
    model = build("G:H+F:A", device="meta", **{"blocks.gated_deltanet.n_heads": 2})
    s = stats(model, seq_len=300, batch=3, dtype=torch.bfloat16)
    measured = model.allocate_cache(3, 300, dtype=torch.bfloat16).nbytes()
    assert (s.kv_cache_bytes, s.state_bytes) == (measured["kv"], measured["state"])
    # Gated DeltaNet: conv over [q, k, v] in bf16 and a fp32 state (heads, head_dim, 2 head_dim) per sequence
    gdn = 3 * (2 * 128 + 256) * 4 * 2 + 3 * 2 * 64 * 128 * 4
    # Hyena: short conv over 3 streams, the long convolution's inputs so far and its fp32 taps (O(seq_len))
    hyena = 3 * 3 * 128 * 3 * 2 + 3 * 128 * 300 * 2 + 128 * 300 * 4
    assert s.state_bytes == gdn + hyena


@pytest.mark.parametrize("layout, overrides", [
    ("4G", {}),
    ("2G", {"blocks.gated_deltanet.expand_v": 1.0, "blocks.gated_deltanet.chunk_size": 32}),
    ("4H", {"blocks.hyena.l_max": 256}),
    ("2H", {"blocks.hyena.order": 3}),
])
def test_forward_flops_match_flop_counter_plus_what_it_cannot_see(layout, overrides):
    """FlopCounterMode counts matmuls, einsums and convs exactly as the hooks do; it has no formula for the
    triangular solve (Gated DeltaNet: T (K + V) per head and token) nor for FFTs (Hyena)."""
    seq_len = 256
    model = build(layout, backend="torch", **overrides)
    invisible = 0
    for m in model.modules():
        if isinstance(m, GatedDeltaNet):
            c = m.config
            invisible += c.n_heads * min(c.chunk_size, seq_len) * (c.head_dim + c.d_v)
        elif isinstance(m, Hyena):
            invisible += m.config.n_filters * fft_flops_per_token(seq_len)
    expected = (stats(model, seq_len=seq_len).flops_forward - invisible) * seq_len
    assert expected == counted_flops(model, seq_len)


@pytest.mark.parametrize("name", list(CASES))
def test_causal_and_finite_in_bf16(name):
    block = CASES[name]().bfloat16()
    x = torch.randn(1, 30, D).bfloat16()
    y = block(x)
    x2 = x.clone()
    x2[:, 20:] = 0
    assert torch.isfinite(y.float()).all() and y.float().abs().max() > 0
    assert torch.equal(block(x2)[:, :20], y[:, :20])


def test_hyena_filters_do_not_depend_on_the_sequence_length():
    block = Hyena(HyenaConfig(d_model=D, l_max=64))
    long, short = block.filter(100), block.filter(10)
    assert long.shape == (D, 100) and max_rel(long[:, :10], short) < 1e-6
    # the time scale is l_max: t runs from 0 to 1 over the first l_max positions, and on beyond them
    t, z = block.filter.features(100, "cpu", torch.float64)
    assert z.shape == (100, 3) and t[0].item() == 0.0 and t[63].item() == 1.0 and t[99].item() == 99 / 63


def test_hyena_long_convolution_equals_direct_convolution_in_the_block():
    """The block's output equals the same computation with the direct (L x L) convolution."""
    block = _randomize(Hyena(HyenaConfig(d_model=D, l_max=32)))
    x = torch.randn(2, 21, D, dtype=torch.float64)
    u = block.in_proj(x).transpose(1, 2)
    u = torch.nn.functional.conv1d(torch.nn.functional.pad(u, (2, 0)), block.conv1d.weight, block.conv1d.bias,
                                   groups=u.shape[1])
    x0, x1, v = u.split(D, dim=1)
    v = x1 * v
    v = causal_conv_direct(v, block.filter(21)) + block.D[0, :, None] * v
    assert max_rel(block(x), block.out_proj((x0 * v).transpose(1, 2))) < 1e-12


def test_gated_deltanet_shapes_and_parameter_count():
    c = GatedDeltaNetConfig(d_model=64, n_heads=4, head_dim=8)
    block = GatedDeltaNet(c)
    assert (c.key_dim, c.value_dim, c.conv_dim) == (32, 64, 128)
    # in_proj -> [q, k, v, z, a, b], conv over [q, k, v], A_log and dt_bias per head, norm weight per d_v, out_proj
    assert sum(p.numel() for p in block.parameters()) == 64 * (128 + 64 + 8) + 128 * 4 + 2 * 4 + 16 + 64 * 64
    assert block.allocate_cache(1, 5).ssm.shape == (1, 4, 8, 16)


@pytest.mark.parametrize("kwargs, message", [
    ({"d_model": 30, "n_heads": 4}, "gated_deltanet: d_model = 30 is not divisible by n_heads = 4"),
    ({"d_model": 32, "head_dim": 3, "expand_v": 0.5}, "expand_v * head_dim = 0.5 * 3 must be a positive integer"),
    ({"d_model": 32, "backend": "mamba_ssm"}, "backend must be one of auto, torch, fla, got 'mamba_ssm'"),
])
def test_gated_deltanet_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        GatedDeltaNetConfig(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"order": 1}, "hyena: order must be at least 2, got 1"),
    ({"emb_dim": 4}, "hyena: emb_dim must be odd and at least 3"),
    ({"l_max": 1}, "hyena: l_max must be at least 2, got 1"),
])
def test_hyena_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        HyenaConfig(d_model=16, **kwargs)


def test_hyena_cache_overflow_is_refused():
    block = Hyena(HyenaConfig(d_model=D))
    cache = block.allocate_cache(1, 4)
    block(torch.randn(1, 4, D), cache)
    with pytest.raises(ValueError, match="Hyena cache holds 4 positions, asked to fill 5"):
        block.step(torch.randn(1, 1, D), cache)


def test_model_generation_cache_matches_full_forward():
    model = build("G:H+F:A", d_model=32, vocab_size=64, **{"blocks.gated_deltanet.n_heads": 2,
                                                           "blocks.attention.n_heads": 2}).double()
    ids = torch.randint(0, 64, (2, 12))
    full = model(ids)
    cache = model.allocate_cache(2, 12)
    steps = [model(ids[:, :5], cache)] + [model(ids[:, t : t + 1], cache, step=True) for t in range(5, 12)]
    assert max_rel(torch.cat(steps, 1), full) < 1e-10


def test_a_model_backend_gated_deltanet_cannot_use_is_one_clear_line(capsys):
    from hybrids.cli import main

    assert main(["info", "2G", "--set", "backend=mamba_ssm"]) == 2
    err = capsys.readouterr().err
    assert "set blocks.gated_deltanet.backend" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
