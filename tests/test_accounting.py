"""Accounting: FLOPs against torch's FlopCounterMode, cache bytes against allocated caches, parameter counts,
width matching and the `hybrids info` / `hybrids layout` commands."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from blocks import ConfigError
from blocks.mamba import Mamba
from hybrids.accounting import match_width, stats
from hybrids.cli import main
from hybrids.config import load_config
from hybrids.model import build

SEQ_LEN = 256
ZAMBA_7B_PARAMS = 7_232_490_496


def causal_sdpa_flops(q, k, v, dropout_p=0.0, is_causal=False, *args, out_shape=None, attn_mask=None, **kwargs):
    """FLOPs of CPU attention (shapes (B, H, T, Dh)), counting only the causal triangle when is_causal.

    FlopCounterMode has no formula for the CPU kernel (it would count 0), and its GPU formulas count the
    dense T x T products; a causal kernel does, and our accounting counts, T (T + 1) / 2 query-key pairs.
    """
    b, h, t_q, d_qk = q
    t_k, d_v = k[2], v[3]
    pairs = t_q * (t_q + 1) // 2 if is_causal and attn_mask is None and t_q == t_k else t_q * t_k
    return 2 * b * h * pairs * (d_qk + d_v)


def counted_flops(model, seq_len: int) -> int:
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len))
    counter = FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: causal_sdpa_flops}
    )
    with torch.no_grad(), counter:
        model(ids)
    return counter.get_total_flops()


def elementwise_scan_flops(model) -> int:
    """Per token, the Mamba1 scan work that runs elementwise (invisible to FlopCounterMode).

    Of the 6 d_inner d_state per token that Mamba's hook counts, the discretisation (delta * B * u) and the
    recurrence (a * h + b) run as elementwise ops; only the read-out C . h runs as a batched matmul (einsum).
    """
    return sum(4 * m.config.d_inner * m.config.d_state for m in model.modules() if isinstance(m, Mamba))


@pytest.mark.parametrize("layout, overrides, tolerance", [
    ("4A+F", {}, 0.0),
    ("4A+F", {"blocks.attention.n_kv_heads": 2, "blocks.attention.rope": True}, 0.0),
    # Mamba2's torch path passes states across chunks with a (chunks + 1)^2 matmul that the hook leaves out
    # (the CUDA kernel does that as a recurrence over chunks): 0.8% here.
    ("4M2", {}, 0.01),
    ("(3M:A*)x2", {}, 0.0),
    ("(3M:A*)x2", {"blocks.mamba.n_heads": 2, "blocks.shared_attention.lora_rank": 4,
                   "blocks.shared_attention.attn_lora_rank": 4}, 0.0),
    ("M+E:A+F", {}, 0.0),  # dropless MoE: every token runs exactly top_k experts
])
def test_forward_flops_match_flop_counter(layout, overrides, tolerance):
    """The analytic forward FLOPs equal what runs, as torch counts matmul, bmm, einsum, conv and attention.

    Compared: stats' forward FLOPs (LM head included) minus the elementwise Mamba1 scan part, against
    FlopCounterMode over a forward of SEQ_LEN tokens on CPU with the torch backend. Mamba2 runs its default
    chunk_size 256, capped by the torch path at 64, which its hook follows for backend="torch".
    """
    model = build(layout, backend="torch", **overrides)
    expected = (stats(model, seq_len=SEQ_LEN).flops_forward - elementwise_scan_flops(model)) * SEQ_LEN
    counted = counted_flops(model, SEQ_LEN)
    assert counted > 0
    assert abs(expected - counted) <= tolerance * counted + 0.5, (expected, counted)  # all within 5%


def test_flops_breakdown_and_training():
    s = stats("M+E:A+F:M2", seq_len=SEQ_LEN, **{"blocks.mamba2.backend": "torch"})
    assert list(s.flops_breakdown) == ["mamba", "moe", "attention", "mlp", "mamba2", "lm_head"]
    assert s.flops_forward == sum(s.flops_breakdown.values())
    assert s.flops_training == 3 * s.flops_forward
    assert s.flops_breakdown["lm_head"] == 2 * 128 * 256
    # router, then top_k = 2 of the 16 experts, each a gated MLP with d_ff = 4 * d_model
    assert s.flops_breakdown["moe"] == 2 * 128 * 16 + 2 * (2 * 3 * 128 * 512)


def test_attention_flops_grow_with_seq_len():
    """Only attention's QK^T and AV depend on L: 4 * H * Dh * (L + 1) / 2 per token and layer."""
    short, long = stats("4A+F", seq_len=100), stats("4A+F", seq_len=300)
    assert long.flops_forward - short.flops_forward == 4 * 2 * 128 * (300 - 100)
    assert stats("4M+F", seq_len=100).flops_forward == stats("4M+F", seq_len=300).flops_forward


@pytest.mark.parametrize("layout", ["4A+F", "4M2", "(3M:A*)x2", "M+E:A+F", "(2M:A*2)x2", "2M:M*:M2:M*"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cache_bytes_match_allocated_caches(layout, dtype):
    model = build(layout, device="meta", **{"blocks.attention.n_kv_heads": 2})
    s = stats(model, seq_len=300, batch=3, dtype=dtype)
    measured = model.allocate_cache(3, 300, dtype=dtype).nbytes()
    assert (s.kv_cache_bytes, s.state_bytes) == (measured["kv"], measured["state"])
    assert s.cache_bytes == sum(measured.values()) > 0


def test_recurrent_state_is_fp32_and_independent_of_seq_len():
    short, long = stats("M", seq_len=10, dtype="bf16"), stats("M", seq_len=10_000, dtype="bf16")
    d_inner, d_state, d_conv = 256, 16, 4
    assert short.state_bytes == long.state_bytes == d_inner * d_conv * 2 + d_inner * d_state * 4
    assert short.kv_cache_bytes == long.kv_cache_bytes == 0


def test_params_unique_vs_per_invocation():
    """Unique counts each Parameter once; per invocation adds the shared weights at every later invocation."""
    model = build("(6M:A*)x2", device="meta")
    s = stats(model)
    shared = model.shared["A_0"]
    shared_weights = sum(p.numel() for p in shared.shared_parameters())
    own = sum(p.numel() for p in shared.invocations.parameters())
    assert s.n_invocations == 2 and s.n_layers == 12
    assert s.params_unique == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert s.params_per_invocation - s.params_unique == shared_weights
    # by hand (d_model 128, vocab 256, tied): attention in 256 wide, 8 heads; MLP 4 x; out_proj per invocation
    assert shared_weights == 256 + 3 * 256 * 256 + 256 * 128 + 128 + 128 * 1024 + 512 * 128
    assert own == 2 * 128 * 128
    assert s.params_embedding == 256 * 128  # tied: the LM head adds nothing


def test_params_by_hand_and_untied_embeddings():
    layer = 4 * 128 * 128 + 128 * 1024 + 512 * 128 + 2 * 128  # attention, gated MLP, two norms
    assert stats("4A+F").params_unique == 256 * 128 + 4 * layer + 128
    untied = stats("4A+F", tie_embeddings=False)
    assert untied.params_unique == 2 * 256 * 128 + 4 * layer + 128
    assert untied.params_embedding == 2 * 256 * 128 and untied.params_non_embedding == 4 * layer + 128


def test_sources_agree():
    config = load_config("(3M:A*)x2", d_model=64)
    from_layout = stats("(3M:A*)x2", d_model=64).to_dict()
    assert stats(config).to_dict() == from_layout == stats(build(config)).to_dict()
    assert from_layout["cache_bytes"] == from_layout["kv_cache_bytes"] + from_layout["state_bytes"]
    with pytest.raises(ConfigError, match="not a built model"):
        stats(build(config), d_model=32)
    with pytest.raises(ConfigError, match="unknown recipe 'zamba-8b'"):
        stats("zamba-8b")
    with pytest.raises(ConfigError, match="unknown dtype"):
        stats("M", dtype="int3")


def test_zamba_7b():
    zamba = stats("zamba-7b", seq_len=4096, batch=1, dtype=torch.bfloat16)
    assert zamba.params_unique == ZAMBA_7B_PARAMS
    assert (zamba.n_layers, zamba.n_invocations) == (76, 13)
    assert zamba.layout == "2M:A*:5M:A*:(6M:A*)x11:3M"
    assert zamba.kv_cache_bytes == 13 * 2 * 16 * 464 * 4096 * 2
    assert zamba.params_embedding == 32000 * 3712
    assert set(zamba.flops_breakdown) == {"mamba", "shared", "lm_head"}
    model = build("zamba-7b", device="meta")
    measured = model.allocate_cache(1, 4096, dtype=torch.bfloat16).nbytes()
    assert (zamba.kv_cache_bytes, zamba.state_bytes) == (measured["kv"], measured["state"])


def test_match_width_recovers_a_width():
    target = stats("4A+F", d_model=256).params_unique
    assert match_width("4A+F", target_params=target) == 256
    flops = stats("4A+F", d_model=384, seq_len=512).flops_forward
    assert match_width("4A+F", target_flops=flops, seq_len=512) == 384


def closest_is(width: int, step: int, count, target: int) -> bool:
    return all(abs(count(width) - target) <= abs(count(w) - target) for w in (width - step, width + step))


def test_match_width_respects_constraints_and_is_closest():
    """Mamba2 (expand 2, headdim 64) builds only at multiples of 32: the others are skipped."""
    target = stats("(3M:A*)x2", d_model=256).params_unique
    width = match_width("6M2", target_params=target)
    assert width % 32 == 0
    assert closest_is(width, 32, lambda d: stats("6M2", d_model=d).params_unique, target)
    flops = stats("(3M:A*)x2", d_model=256, seq_len=1024).flops_forward
    width = match_width("6M2", target_flops=flops, seq_len=1024)
    assert width % 32 == 0
    assert closest_is(width, 32, lambda d: stats("6M2", d_model=d, seq_len=1024).flops_forward, flops)


def test_match_width_with_overrides_and_multiple_of():
    target = stats("4A+F", d_model=200).params_unique
    width = match_width("4A+F", target_params=target, multiple_of=24, **{"blocks.attention.n_heads": 4})
    assert width % 24 == 0 and width in (192, 216)


def test_match_width_errors():
    with pytest.raises(ConfigError, match="exactly one"):
        match_width("4A+F")
    with pytest.raises(ConfigError, match="exactly one"):
        match_width("4A+F", target_params=1, target_flops=1)
    with pytest.raises(ConfigError, match="searches d_model"):
        match_width("4A+F", target_params=1, d_model=64)
    with pytest.raises(ConfigError, match="beyond d_model 512"):
        match_width("4A+F", target_params=10**12, max_d_model=512)
    with pytest.raises(ConfigError, match="no d_model"):
        match_width("4A+F", target_params=10**6, max_d_model=64, **{"blocks.attention.n_heads": 9})


def test_cli_info_zamba(capsys):
    assert main(["info", "zamba-7b"]) == 0
    out = capsys.readouterr().out
    assert "7,232,490,496" in out and "2M:A*:5M:A*:(6M:A*)x11:3M" in out
    assert "layer 75" not in out
    assert main(["info", "zamba-7b", "--layers", "--seq-len", "4096"]) == 0
    out = capsys.readouterr().out
    assert "layer 75: M" in out and f"{13 * 2 * 16 * 464 * 4096 * 2:,}" in out


def test_cli_info_set_and_dtype(capsys):
    assert main(["info", "4A+F", "--set", "d_model=256", "--set", "blocks.attention.n_kv_heads=2",
                 "--dtype", "fp32", "--batch", "2", "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    s = stats("4A+F", seq_len=64, batch=2, dtype="fp32", d_model=256, **{"blocks.attention.n_kv_heads": 2})
    assert s.table() == out.rstrip("\n")
    assert f"{s.kv_cache_bytes:,}" in out and "float32" in out


def test_cli_layout_keeps_resolution_and_adds_stats(capsys):
    assert main(["layout", "6M:A*", "--depth", "78", "--d-model", "512", "--set", "blocks.mamba.d_state=32"]) == 0
    out = capsys.readouterr().out
    assert "layout: (6M:A*)x12:6M" in out and "backbone layers: 78, shared invocations: 12" in out
    assert "layer 72: M  <- A*[0] invocation 11" in out
    s = stats("6M:A*", depth=78, d_model=512, **{"blocks.mamba.d_state": 32})
    assert s.table() in out and f"{s.params_unique:,}" in out


@pytest.mark.parametrize("argv, message", [
    (["info", "6M:A*x("], "\n  6M:A*x(\n        ^"),
    (["layout", "6M:Q"], "^"),
    (["info", "zamba-8b"], "unknown recipe 'zamba-8b'"),
    (["info", "zamba-7b", "--set", "blocks.mamba.nope=1"], "unknown key(s) nope for block 'mamba'"),
    (["info", "zamba-7b", "--set", "nope=1"], "unknown model config key(s) nope"),
    (["layout", "M2", "--d-model", "40"], "not divisible by headdim"),
])
def test_cli_errors_exit_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hybrids: error: ") and message in err and "Traceback" not in err
