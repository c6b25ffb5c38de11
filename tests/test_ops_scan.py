import pytest
import torch

from blocks.ops.scan import linear_scan, linear_scan_ref
from tests.inputs import grads, leaf, max_rel


@pytest.mark.parametrize("length", [1, 2, 3, 17, 64, 100])
def test_linear_scan_matches_sequential_with_gradients(length):
    a, b, h0 = leaf(torch.rand(2, length, 3, 4, dtype=torch.float64), torch.randn(2, length, 3, 4, dtype=torch.float64),
                    torch.randn(2, 3, 4, dtype=torch.float64))
    out, ref = linear_scan(a, b, h0), linear_scan_ref(a, b, h0)
    assert out.dtype == torch.float64
    assert max_rel(out, ref) < 1e-12
    for g, r in zip(grads(out, [a, b, h0]), grads(ref, [a, b, h0]), strict=True):
        assert max_rel(g, r) < 1e-12


def test_linear_scan_inputs_untouched_and_fp32_for_low_precision():
    a, b = torch.rand(1, 9, 2).bfloat16(), torch.randn(1, 9, 2).bfloat16()
    a0, b0 = a.clone(), b.clone()
    h = linear_scan(a, b)
    assert h.dtype == torch.float32
    assert torch.equal(a, a0) and torch.equal(b, b0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_scan_strong_decay_length_4096_is_finite_and_accurate(dtype):
    # decays down to exp(-30) per step: a cumulative-product formulation would underflow to 0 and divide.
    log_a = -30 * torch.rand(2, 4096, 8, dtype=torch.float64)
    a, b = log_a.exp(), torch.randn(2, 4096, 8, dtype=torch.float64)
    a_lp, b_lp = a.to(dtype), b.to(dtype)
    ref = linear_scan_ref(a_lp.double(), b_lp.double())
    out = linear_scan(a_lp.requires_grad_(), b_lp.requires_grad_())
    assert torch.isfinite(out).all()
    assert max_rel(out, ref) < 1e-6
    ga, gb = grads(out, [a_lp, b_lp])
    assert torch.isfinite(ga).all() and torch.isfinite(gb).all()
