import pytest
import torch

from blocks.ops.selective_scan import selective_scan_ref, selective_scan_torch, selective_state_update
from tests.inputs import grads, max_rel, selective_scan_inputs


@pytest.mark.parametrize(
    "length,groups,use_z,use_d",
    [(1, 1, True, True), (37, 1, True, True), (64, 2, False, True), (129, 4, True, False)],
)
def test_selective_scan_matches_sequential_outputs_and_all_gradients(length, groups, use_z, use_d):
    u, delta, A, B, C, D, z, bias = inputs = selective_scan_inputs(length=length, groups=groups)
    h0 = torch.randn(2, 8, 4, dtype=torch.float64, requires_grad=True)
    kw = dict(D=D if use_d else None, z=z if use_z else None, delta_bias=bias, delta_softplus=True,
              initial_state=h0, return_final_state=True)
    out, ref = selective_scan_torch(u, delta, A, B, C, **kw), selective_scan_ref(u, delta, A, B, C, **kw)
    assert max_rel(out[0], ref[0]) < 1e-12 and max_rel(out[1], ref[1]) < 1e-12
    used = [t for t in inputs + [h0] if t is not D or use_d if t is not z or use_z]
    for g, r in zip(grads(out, used), grads(ref, used), strict=True):
        assert max_rel(g, r) < 1e-10


def test_selective_scan_accepts_ungrouped_B_C():
    u, delta, A, B, C, D, z, bias = selective_scan_inputs(length=20)
    grouped = selective_scan_torch(u, delta, A, B, C, D, z, bias, True)
    plain = selective_scan_torch(u, delta, A, B[:, 0], C[:, 0], D, z, bias, True)
    assert torch.equal(grouped, plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_scan_strong_decay_length_4096(dtype):
    u, delta, A, B, C, D, z, bias = selective_scan_inputs(b=1, d=4, n=4, length=4096, dtype=torch.float64, decay=20.0)
    args = [t.detach().to(dtype) for t in (u, delta, A, B, C, D, z, bias)]
    ref = selective_scan_ref(*[a.double() for a in args], delta_softplus=True)
    out = selective_scan_torch(*args, delta_softplus=True)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert max_rel(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_step_form_matches_parallel_form():
    u, delta, A, B, C, D, z, bias = (t.detach() for t in selective_scan_inputs(length=12, groups=2))
    full, final = selective_scan_torch(u, delta, A, B, C, D, z, bias, True, return_final_state=True)
    state = torch.zeros(2, 8, 4, dtype=torch.float64)
    steps = [selective_state_update(state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D, z[..., t], bias, True)
             for t in range(12)]
    assert max_rel(torch.stack(steps, -1), full) < 1e-12
    assert max_rel(state, final) < 1e-12
