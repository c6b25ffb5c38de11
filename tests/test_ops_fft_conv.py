"""Long causal convolution: FFT form against the direct convolution and a sum over taps, step form, FLOP count."""

import math

import pytest
import torch

from blocks.ops.fft_conv import causal_conv_direct, causal_conv_step, fft_causal_conv, fft_flops_per_token
from tests.inputs import grads, leaf, max_rel


@pytest.mark.parametrize("length", [1, 2, 7, 64, 100, 333])
def test_fft_matches_direct_convolution_outputs_and_gradients(length):
    u, h = leaf(torch.randn(2, 3, length, dtype=torch.float64), torch.randn(3, length + 5, dtype=torch.float64))
    out, ref = fft_causal_conv(u, h), causal_conv_direct(u, h)
    assert out.shape == (2, 3, length) and max_rel(out, ref) < 1e-13
    for g, r in zip(grads(out, [u, h]), grads(ref, [u, h]), strict=True):
        assert max_rel(g, r) < 1e-13


def test_direct_convolution_is_the_causal_sum_over_taps():
    u, h = torch.randn(1, 2, 9, dtype=torch.float64), torch.randn(2, 9, dtype=torch.float64)
    by_hand = torch.stack([sum(h[:, s] * u[:, :, t - s] for s in range(t + 1)) for t in range(9)], dim=-1)
    assert max_rel(causal_conv_direct(u, h), by_hand) < 1e-15


def test_step_form_matches_fft_form():
    u, h = torch.randn(2, 3, 40, dtype=torch.float64), torch.randn(3, 50, dtype=torch.float64)
    steps = torch.stack([causal_conv_step(u, h, t + 1) for t in range(40)], dim=-1)
    assert max_rel(steps, fft_causal_conv(u, h)) < 1e-13


def test_fp32_long_filter_accuracy():
    u, h = torch.randn(1, 4, 4096), torch.randn(4, 4096) * torch.exp(-torch.arange(4096) / 500.0)
    ref = causal_conv_direct(u.double(), h.double())
    assert max_rel(fft_causal_conv(u, h), ref) < 1e-5


def test_fft_flops_per_token():
    # three real FFTs of 2L points at 2.5 n log2 n and L + 1 complex products, per token
    assert fft_flops_per_token(1024) == round((3 * 2.5 * 2048 * 11 + 6 * 1025) / 1024)
    assert fft_flops_per_token(4096) - fft_flops_per_token(2048) == round(15 * math.log2(2))
