"""Gated delta rule: chunked (WY) form against the sequential reference, step form, and the fla fallback rules."""

import logging

import pytest
import torch
import torch.nn.functional as F

from blocks import ConfigError, ops
from blocks.ops import fla_kernels
from blocks.ops.delta_rule import delta_rule_chunked, delta_rule_ref, delta_rule_step
from tests.inputs import grads, leaf, max_rel


def delta_inputs(b=2, length=45, heads=3, d_k=4, d_v=5, dtype=torch.float64, decay=1.0):
    """q, k (L2-normalised), v, g = log alpha (<= 0), beta in (0, 1), as leaves."""
    k = F.normalize(torch.randn(b, length, heads, d_k, dtype=dtype), dim=-1)
    g = -F.softplus(torch.randn(b, length, heads, dtype=dtype)) * decay
    return leaf(torch.randn(b, length, heads, d_k, dtype=dtype), k, torch.randn(b, length, heads, d_v, dtype=dtype),
                g, torch.rand(b, length, heads, dtype=dtype))


@pytest.mark.parametrize("length, chunk", [(1, 8), (16, 8), (45, 16), (45, 64), (100, 32), (37, 1)])
def test_chunked_matches_sequential_outputs_states_and_all_gradients(length, chunk):
    inputs = delta_inputs(length=length)
    h0 = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    kw = dict(scale=0.7, initial_state=h0, return_final_state=True)
    out, ref = delta_rule_chunked(*inputs, chunk_size=chunk, **kw), delta_rule_ref(*inputs, **kw)
    assert max_rel(out[0], ref[0]) < 1e-12 and max_rel(out[1], ref[1]) < 1e-12
    for g, r in zip(grads(out, inputs + [h0]), grads(ref, inputs + [h0]), strict=True):
        assert max_rel(g, r) < 1e-10


def test_reference_is_the_delta_rule_as_written():
    """S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T, o_t = S_t q_t with S of shape (d_v, d_k)."""
    q, k, v, g, beta = (t.detach() for t in delta_inputs(b=1, length=6, heads=1))
    S = torch.zeros(5, 4, dtype=torch.float64)
    outs = []
    for t in range(6):
        kt, bt = k[0, t, 0], beta[0, t, 0]
        S = g[0, t, 0].exp() * S @ (torch.eye(4, dtype=torch.float64) - bt * torch.outer(kt, kt)) \
            + bt * torch.outer(v[0, t, 0], kt)
        outs.append(S @ (q[0, t, 0] * 4**-0.5))
    o, state = delta_rule_ref(q, k, v, g, beta, return_final_state=True)
    assert max_rel(o[0, :, 0], torch.stack(outs)) < 1e-14
    assert max_rel(state[0, 0], S.T) < 1e-14


def test_step_form_matches_chunked_form():
    q, k, v, g, beta = (t.detach() for t in delta_inputs(length=21))
    full, final = delta_rule_chunked(q, k, v, g, beta, chunk_size=8, return_final_state=True)
    state = torch.zeros(2, 3, 4, 5, dtype=torch.float64)
    steps = [delta_rule_step(state, q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t]) for t in range(21)]
    assert max_rel(torch.stack(steps, 1), full) < 1e-12
    assert max_rel(state, final) < 1e-12


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_strong_decay_long_sequence_is_finite_and_accurate(dtype, tol):
    q, k, v, g, beta = (t.detach() for t in delta_inputs(b=1, length=1024, heads=2, decay=20.0))
    ref = delta_rule_ref(q, k, v, g, beta)
    out = ops.gated_delta_rule(*(t.to(dtype) for t in (q, k, v)), g.float(), beta.float(), chunk_size=64,
                               backend="torch")
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert max_rel(out, ref) < tol


def test_fla_refusal_rules():
    assert fla_kernels.refusal(None, (9, 0), "3.7.1") is None
    assert fla_kernels.refusal(None, (8, 0), "3.6.0") is None  # only Hopper is affected
    assert "Hopper with Triton 3.6.0 (needs >= 3.7.1)" in fla_kernels.refusal(None, (9, 0), "3.6.0")
    assert "Triton 3.7.0+gitabc" in fla_kernels.refusal(None, (9, 0), "3.7.0+gitabc")
    assert "does not import (ModuleNotFoundError" in fla_kernels.refusal("ModuleNotFoundError: fla", (9, 0), None)
    assert fla_kernels.version_tuple("3.10.0rc1") == (3, 10, 0) > fla_kernels.HOPPER_MIN_TRITON


def test_fla_fallback_warns_once(caplog):
    fla_kernels.warn_fallback.cache_clear()
    with caplog.at_level(logging.WARNING, logger="hybrids"):
        for _ in range(3):
            fla_kernels.warn_fallback("reason x")
    assert [r.getMessage().count("reason x") for r in caplog.records] == [1]


def test_backend_choice_on_cpu():
    assert fla_kernels.resolve("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ConfigError, match="backend 'fla' needs CUDA tensors"):
        fla_kernels.resolve("fla", torch.device("cpu"))
    with pytest.raises(ConfigError, match="backend must be one of auto, torch, fla, got 'mamba_ssm'"):
        fla_kernels.resolve("mamba_ssm", torch.device("cpu"))
