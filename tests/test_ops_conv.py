import pytest
import torch

from blocks import ops
from blocks.ops.conv import causal_conv1d_ref, causal_conv1d_torch, causal_conv1d_update_torch, conv_state_from
from tests.inputs import grads, leaf, max_rel


@pytest.mark.parametrize("length,width,activation", [(1, 4, "silu"), (3, 4, None), (50, 4, "silu"), (33, 2, "silu")])
def test_causal_conv_matches_tap_sum_with_gradients(length, width, activation):
    x, w, b = leaf(torch.randn(2, 6, length, dtype=torch.float64), torch.randn(6, width, dtype=torch.float64),
                   torch.randn(6, dtype=torch.float64))
    out, ref = causal_conv1d_torch(x, w, b, activation), causal_conv1d_ref(x, w, b, activation)
    assert max_rel(out, ref) < 1e-12
    for g, r in zip(grads(out, [x, w, b]), grads(ref, [x, w, b]), strict=True):
        assert max_rel(g, r) < 1e-12


def test_conv_is_causal():
    x, w = torch.randn(1, 3, 20), torch.randn(3, 4)
    y = causal_conv1d_torch(x, w)
    x2 = x.clone()
    x2[..., 10:] += 1.0
    assert torch.equal(causal_conv1d_torch(x2, w)[..., :10], y[..., :10])


def test_update_steps_match_full_conv_and_state_after_prefill():
    x, w, b = torch.randn(2, 5, 9, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64), torch.randn(5).double()
    full = ops.causal_conv1d(x, w, b, "silu", backend="torch")
    state = conv_state_from(x[..., :3], 4).clone()
    assert state.shape == (2, 5, 4) and torch.equal(state[..., 0], torch.zeros(2, 5, dtype=torch.float64))
    steps = [causal_conv1d_update_torch(x[..., t], state, w, b, "silu") for t in range(3, 9)]
    assert max_rel(torch.stack(steps, -1), full[..., 3:]) < 1e-12
    assert torch.equal(state, x[..., -4:])
