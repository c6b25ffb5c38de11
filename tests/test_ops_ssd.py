import pytest
import torch

from blocks import ops
from blocks.ops.ssd import segsum, ssd_chunked, ssd_ref, ssd_state_update
from tests.inputs import grads, max_rel, ssd_inputs


def test_segsum_entries():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    s = segsum(x)
    assert s[3, 1].item() == 3.0 + 4.0 and s[2, 2].item() == 0.0 and s[1, 0].item() == 2.0
    assert torch.isneginf(s[0, 1]) and torch.isneginf(s[1, 3])


@pytest.mark.parametrize(
    "length,chunk,groups,d_shape",
    [(1, 8, 1, "h"), (16, 8, 2, "h"), (45, 16, 2, "hp"), (45, 64, 4, "h"), (100, 32, 1, "hp")],
)
def test_ssd_chunked_matches_sequential_outputs_and_all_gradients(length, chunk, groups, d_shape):
    x, dt, A, B, C, D, z, bias = inputs = ssd_inputs(length=length, groups=groups)
    if d_shape == "hp":
        D = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
        inputs[5] = D
    h0 = torch.randn(2, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    kw = dict(D=D, z=z, dt_bias=bias, dt_softplus=True, initial_states=h0, return_final_states=True)
    out, ref = ssd_chunked(x, dt, A, B, C, chunk, **kw), ssd_ref(x, dt, A, B, C, **kw)
    assert max_rel(out[0], ref[0]) < 1e-12 and max_rel(out[1], ref[1]) < 1e-12
    for g, r in zip(grads(out, inputs + [h0]), grads(ref, inputs + [h0]), strict=True):
        assert max_rel(g, r) < 1e-10


def test_ssd_dt_limit_clamps_like_reference():
    x, dt, A, B, C, D, z, bias = (t.detach() for t in ssd_inputs(length=30))
    kw = dict(dt_bias=bias, dt_softplus=True, dt_limit=(0.05, 0.5))
    assert max_rel(ssd_chunked(x, dt, A, B, C, 8, **kw), ssd_ref(x, dt, A, B, C, **kw)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ssd_strong_decay_length_4096(dtype):
    x, dt, A, B, C, D, z, bias = ssd_inputs(b=1, length=4096, heads=2, headdim=4, groups=1, n=4, decay=20.0)
    args = [t.detach().to(dtype) for t in (x, dt, A, B, C)]
    ref = ssd_ref(*[a.double() for a in args], dt_softplus=True)
    out = ops.ssd(*args, chunk_size=256, dt_softplus=True, backend="torch")
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert max_rel(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_step_form_matches_chunked_form():
    x, dt, A, B, C, D, z, bias = (t.detach() for t in ssd_inputs(length=21))
    full, final = ssd_chunked(x, dt, A, B, C, 8, D, z, bias, True, return_final_states=True)
    state = torch.zeros(2, 4, 3, 5, dtype=torch.float64)
    steps = [ssd_state_update(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D, z[:, t], bias, True) for t in range(21)]
    assert max_rel(torch.stack(steps, 1), full) < 1e-12
    assert max_rel(state, final) < 1e-12
