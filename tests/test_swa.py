"""Sliding-window attention: the chunked op against an explicit band mask, the block's rolling KV cache
(step-by-step decoding = parallel forward past the window), gradients, cache bytes and FLOPs as accounted."""

import pytest
import torch

from blocks import ConfigError, SlidingKVCache
from blocks.attention import Attention, AttentionConfig, apply_rope, keys_read, rope_cos_sin
from blocks.ops.window import band_mask, sliding_window_attention, sliding_window_attention_ref
from blocks.sliding_attention import SlidingAttentionConfig, SlidingWindowAttention
from hybrids.accounting import stats
from hybrids.model import build
from tests.inputs import grads, leaf, max_rel

pytestmark = pytest.mark.usefixtures("one_thread")
D = 16


def qkv(b=2, heads=4, kv_heads=2, queries=37, keys=37, dh=8, dv=8):
    q = torch.randn(b, heads, queries, dh, dtype=torch.float64)
    return leaf(q, torch.randn(b, kv_heads, keys, dh, dtype=torch.float64),
                torch.randn(b, kv_heads, keys, dv, dtype=torch.float64))


def block(window=5, **options):
    options = {"n_heads": 4, "n_kv_heads": 2, "rope": True, **options}
    attn = SlidingWindowAttention(SlidingAttentionConfig(d_model=D, window=window, **options)).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return attn


def test_band_mask_sees_the_last_window_keys_itself_included():
    assert band_mask(4, 4, 2).int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    # two queries after three cached keys: positions 3 and 4 of keys 0..4
    assert band_mask(2, 5, 3).int().tolist() == [[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]]


@pytest.mark.parametrize("window, chunk, queries, keys, dv", [
    (5, 4, 37, 37, 8),  # chunks smaller than the window: the op widens them to the window
    (5, 8, 37, 37, 6),  # values narrower than keys (Hymba widens them)
    (3, 4, 9, 14, 8),  # queries after 5 cached keys
    (64, 256, 37, 37, 8),  # window longer than the sequence: plain causal attention
    (1, 4, 11, 11, 8),  # each query sees only itself
])
def test_chunked_op_equals_explicit_band_mask_forward_and_backward(window, chunk, queries, keys, dv):
    q, k, v = qkv(queries=queries, keys=keys, dv=dv)
    out = sliding_window_attention(q, k, v, window, enable_gqa=True, chunk=chunk)
    ref = sliding_window_attention_ref(q, k, v, window)
    assert out.shape == (2, 4, queries, dv)
    assert max_rel(out, ref) < 1e-12
    for g, g_ref in zip(grads(out, [q, k, v]), grads(ref, [q, k, v]), strict=True):
        assert torch.isfinite(g).all() and (g - g_ref).abs().max() < 1e-12 * max(g_ref.abs().max(), 1)


def test_window_one_returns_each_positions_own_value():
    q, k, v = qkv(heads=2, kv_heads=2, queries=7, keys=7)
    assert torch.allclose(sliding_window_attention(q, k, v, 1), v, atol=1e-15, rtol=0)


def test_block_equals_full_attention_with_a_band_mask_and_full_attention_when_the_window_covers_all():
    attn = block(window=4, v_head_dim=6)
    x = torch.randn(2, 19, D, dtype=torch.float64)
    q, k, v = (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))
    q, k, v = (t.unflatten(-1, (-1, d)).transpose(1, 2) for t, d in ((q, 4), (k, 4), (v, 6)))
    cos, sin = rope_cos_sin(torch.arange(19), 4, 10000.0)
    ref = sliding_window_attention_ref(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, 4)
    assert max_rel(attn(x), attn.o_proj(ref.transpose(1, 2).flatten(2))) < 1e-12
    wide = block(window=19)
    full = Attention(AttentionConfig(d_model=D, n_heads=4, n_kv_heads=2, rope=True)).double()
    full.load_state_dict(wide.state_dict())
    assert max_rel(wide(x), full(x)) < 1e-12
    assert max_rel(block(window=4)(x), full(x)) > 1e-3  # and a short window does change the result


@pytest.mark.parametrize("prefill, length", [(3, 19), (9, 19), (1, 12)])
def test_step_by_step_decoding_equals_the_parallel_forward_past_the_window(prefill, length):
    attn = block(window=5)
    x = torch.randn(2, length, D, dtype=torch.float64)
    cache = attn.allocate_cache(2, length, dtype=torch.float64)
    assert isinstance(cache, SlidingKVCache) and cache.k.shape == (2, 2, 5, 4)
    outs = [attn(x[:, :prefill], cache)]
    outs += [attn.step(x[:, t : t + 1], cache) for t in range(prefill, length)]
    assert cache.length == length
    assert max_rel(torch.cat(outs, 1), attn(x)) < 1e-12


def test_a_cache_shorter_than_the_window_refuses_to_overflow():
    attn = block(window=8)
    cache = attn.allocate_cache(2, 5, dtype=torch.float64)
    attn(torch.randn(2, 5, D, dtype=torch.float64), cache)
    with pytest.raises(ValueError, match="^KV cache holds 5 positions, asked to fill 6$"):
        attn.step(torch.randn(2, 1, D, dtype=torch.float64), cache)


def test_prefill_in_chunks_longer_than_the_window():
    attn = block(window=4)
    x = torch.randn(2, 23, D, dtype=torch.float64)
    cache = attn.allocate_cache(2, 23, dtype=torch.float64)
    outs = [attn(x[:, a:b], cache) for a, b in ((0, 6), (6, 7), (7, 16), (16, 23))]
    assert max_rel(torch.cat(outs, 1), attn(x)) < 1e-12


def test_gradients_are_finite_and_reach_every_weight():
    attn = block(window=3)
    x = torch.randn(2, 17, D, dtype=torch.float64, requires_grad=True)
    attn(x).pow(2).sum().backward()
    for name, p in [("x", x), *attn.named_parameters()]:
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("length", [3, 6, 40])
def test_rolling_cache_bytes_measured_equal_accounted(length):
    attn = SlidingWindowAttention(SlidingAttentionConfig(d_model=D, n_heads=4, n_kv_heads=2, v_head_dim=6, window=6))
    cache = attn.allocate_cache(3, length, dtype=torch.bfloat16)
    measured = sum(t.nbytes for t in cache.tensors())
    # batch 3 x min(length, 6) positions x 2 KV heads x (4 key + 6 value channels) x 2 bytes
    assert measured == attn.cache_bytes(3, length, torch.bfloat16)["kv"] == 3 * min(length, 6) * 2 * 10 * 2
    assert cache.nbytes_by_kind() == {"kv": measured, "state": 0}


def test_model_cache_of_a_windowed_layout_measured_equals_accounted_and_generation_matches_forward():
    overrides = {"blocks.sliding_attention.n_heads": 4, "blocks.sliding_attention.window": 4,
                 "blocks.attention.n_heads": 4}
    model = build("W+F:M:A+F:W", d_model=D, vocab_size=32, **overrides).double()
    prompt = torch.randint(0, 32, (2, 5))
    out = model.generate(prompt, max_new_tokens=9)
    for t in range(5, 14):  # greedy decoding through the rolling caches = argmax of the full forward
        assert torch.equal(model(out[:, :t])[:, -1].argmax(-1), out[:, t])
    cache = model.allocate_cache(2, 14, dtype=torch.bfloat16)
    accounted = stats(model, seq_len=14, batch=2, dtype=torch.bfloat16)
    assert cache.nbytes() == {"kv": accounted.kv_cache_bytes, "state": accounted.state_bytes}
    # two windowed layers hold 4 positions, the full one 14: 2 x (4 + 4 + 14) x 4 heads x 8 channels x 2 bytes
    assert accounted.kv_cache_bytes == 2 * 22 * 4 * 8 * 2


def test_flops_count_the_keys_each_query_reads():
    assert keys_read(10, None) == 55 and keys_read(10, 20) == 55
    assert keys_read(10, 3) == sum(min(i, 3) for i in range(1, 11)) == 27
    full = Attention(AttentionConfig(d_model=D, n_heads=4))
    windowed = SlidingWindowAttention(SlidingAttentionConfig(d_model=D, n_heads=4, window=3))
    projections = 4 * 2 * D * D
    assert full.flops_per_token(10) == projections + 2 * 4 * 8 * 55 // 10
    assert windowed.flops_per_token(10) == projections + 2 * 4 * 8 * 27 // 10
    assert windowed.flops_per_token(2) == full.flops_per_token(2)


@pytest.mark.parametrize("make, message", [
    (lambda: AttentionConfig(d_model=D, window=0),
     "attention: window must be a positive number of keys or None (full attention), got 0"),
    (lambda: SlidingAttentionConfig(d_model=D, window=None),
     "sliding_attention: window must be a positive number of keys; use A for full attention"),
])
def test_bad_windows_are_one_clear_line(make, message):
    with pytest.raises(ConfigError) as err:
        make()
    assert str(err.value) == message


def test_hf_jamba_export_refuses_windowed_attention():
    from hybrids.hf.jamba import hf_config

    model = build("M+F:W+F", d_model=D, device="meta", **{"blocks.sliding_attention.n_heads": 4,
                                                         "blocks.mamba.inner_norms": True,
                                                         "blocks.mamba.norm_eps": 1e-5})
    with pytest.raises(ConfigError, match="^HF Jamba's attention has no RoPE, no bias, no window,"):
        hf_config(model)
