"""PyTorch path vs the mamba-ssm kernels on CUDA: outputs and every gradient, fp32 and bf16.

Run on a GPU machine with mamba_ssm built: `pytest -m gpu`. With HYBRIDS_GPU_REPORT=path, each test
appends its largest relative errors to that JSON-lines file.
"""

import json
import os

import pytest
import torch

from blocks import ops
from blocks.mamba import Mamba, MambaConfig
from blocks.mamba2 import Mamba2, Mamba2Config
from blocks.ops.backend import importable
from tests.inputs import grads, max_rel, selective_scan_inputs, ssd_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and importable("mamba_ssm")), reason="needs CUDA and mamba_ssm"),
]
TOL = {torch.float32: 5e-3, torch.bfloat16: 5e-2}


def report(name, dtype, errors):
    path = os.environ.get("HYBRIDS_GPU_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": name, "dtype": str(dtype), **errors}) + "\n")


def compare(name, dtype, torch_out, kernel_out, inputs, grad_outputs=2):
    """Largest relative errors of the outputs and of the gradients through the first `grad_outputs` outputs."""
    errors = {"out": max(max_rel(k.float(), t.float()) for t, k in zip(torch_out, kernel_out, strict=True))}
    gt, gk = grads(tuple(torch_out[:grad_outputs]), inputs), grads(tuple(kernel_out[:grad_outputs]), inputs)
    errors["grad"] = max(max_rel(k.float(), t.float()) for t, k in zip(gt, gk, strict=True) if t is not None)
    report(name, dtype, errors)
    assert errors["out"] < TOL[dtype] and errors["grad"] < TOL[dtype], errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups,length", [(1, 1000), (2, 2048)])
def test_selective_scan_torch_vs_kernel(dtype, groups, length):
    u, delta, A, B, C, D, z, bias = inputs = selective_scan_inputs(
        b=2, d=128, n=16, length=length, groups=groups, dtype=torch.float32, device="cuda")
    lowp = [t.detach().to(dtype).requires_grad_() if t.dim() == 3 or t.dim() == 4 else t for t in inputs]
    u, delta, A, B, C, D, z, bias = lowp
    args = (u, delta, A, B, C, D, z, bias, True, True)
    t_out = ops.selective_scan(*args, backend="torch")
    k_out = ops.selective_scan(*args, backend="mamba_ssm")
    # selective_scan_fn does not backpropagate through its last state (training never needs it)
    compare(f"selective_scan g{groups} L{length}", dtype, t_out, k_out, lowp, grad_outputs=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length,chunk", [(1000, 256), (2048, 256)])
def test_ssd_torch_vs_kernel(dtype, length, chunk):
    inputs = ssd_inputs(b=2, length=length, heads=8, headdim=64, groups=2, n=64, dtype=torch.float32, device="cuda")
    lowp = [t.detach().to(dtype).requires_grad_() if t.dim() >= 3 else t for t in inputs]
    x, dt, A, B, C, D, z, bias = lowp
    kw = dict(D=D, z=z, dt_bias=bias, dt_softplus=True, return_final_states=True)
    t_out = ops.ssd(x, dt, A, B, C, chunk, backend="torch", **kw)
    k_out = ops.ssd(x, dt, A, B, C, chunk, backend="mamba_ssm", **kw)
    compare(f"ssd L{length} chunk{chunk}", dtype, t_out, k_out, lowp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make", [
    lambda b: Mamba(MambaConfig(d_model=256, n_heads=2, backend=b)),
    lambda b: Mamba2(Mamba2Config(d_model=256, headdim=64, d_state=64, ngroups=2, backend=b)),
], ids=["mamba", "mamba2"])
def test_block_backends_agree_and_step_matches(dtype, make):
    torch.manual_seed(0)
    ref = make("torch").cuda().to(dtype)
    fast = make("mamba_ssm").cuda().to(dtype)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 300, 256, device="cuda", dtype=dtype)
    y_ref, y_fast = ref(x), fast(x)
    params = list(ref.parameters())
    g_ref = torch.autograd.grad(y_ref.float().square().mean(), params)
    g_fast = torch.autograd.grad(y_fast.float().square().mean(), list(fast.parameters()))
    errors = {"out": max_rel(y_fast.float(), y_ref.float()),
              "grad": max(max_rel(b.float(), a.float()) for a, b in zip(g_ref, g_fast, strict=True))}
    # kernel step form vs kernel full form, after a prefill
    with torch.no_grad():
        cache = fast.allocate_cache(2, 300, device="cuda", dtype=dtype)
        outs = [fast(x[:, :200], cache)] + [fast.step(x[:, t : t + 1], cache) for t in range(200, 300)]
        errors["step"] = max_rel(torch.cat(outs, 1).float(), y_fast.float())
    report(f"block {type(ref).__name__}", dtype, errors)
    assert all(e < TOL[dtype] for e in errors.values()), errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["rms", "gated", "norm_first", "gated_groups", "no_gate"])
def test_fused_norms_equal_the_torch_path(dtype, kind):
    """mamba-ssm's Triton norms against the PyTorch path: outputs and the gradients of x, z and the weight."""
    from blocks.ops import norm

    x = torch.randn(2, 300, 512, device="cuda", dtype=dtype, requires_grad=True)
    z = torch.randn_like(x, requires_grad=True)
    weight = (1 + 0.1 * torch.randn(512, device="cuda", dtype=dtype)).requires_grad_()
    if kind == "rms":
        def run(backend):
            return (norm.rms_norm(x, weight, 1e-5, backend),)
        inputs = [x, weight]
    else:
        group = 128 if kind == "gated_groups" else 512
        gate = None if kind == "no_gate" else z

        def run(backend):
            return (norm.gated_rms_norm(x, gate, weight, 1e-5, group, kind == "norm_first", backend),)
        inputs = [x, weight] + ([z] if gate is not None else [])
    compare(f"norm {kind}", dtype, run("torch"), run("mamba_ssm"), inputs, grad_outputs=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("documents", [False, True], ids=["one-doc", "docs"])
@pytest.mark.parametrize("bias,activation", [(True, "silu"), (False, None)])
def test_triton_conv_equals_the_torch_path(dtype, documents, bias, activation):
    """Our Triton causal conv (used where causal-conv1d is not installed) against the PyTorch path: output and the
    gradients of x, weight and bias, on channels-last input as the mixers hold it, with document starts."""
    from blocks.ops import conv_triton
    from blocks.ops.conv import causal_conv1d_torch
    from blocks.ops.documents import positions

    x = torch.randn(2, 1000, 320, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()  # (B, D, L) view
    w = torch.randn(320, 4, device="cuda", requires_grad=True)
    b = torch.randn(320, device="cuda", requires_grad=True) if bias else None
    doc = None
    if documents:
        doc = torch.zeros(2, 1000, dtype=torch.long, device="cuda")
        doc[:, 300:], doc[1, 301:] = 1, 2
    inputs = [x, w] + ([b] if bias else [])
    ref = causal_conv1d_torch(x.float(), w, b, activation, doc).to(dtype)  # fp32 reference
    got = conv_triton.causal_conv1d(x, w, b, activation, positions(doc) if documents else None)
    assert got.dtype == dtype and got.transpose(1, 2).is_contiguous()
    compare(f"triton conv {activation} docs={documents}", dtype, (ref,), (got,), inputs, grad_outputs=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rope_dim,per_row", [(64, False), (32, True)], ids=["full", "partial-per-row"])
def test_triton_rope_equals_the_torch_path(dtype, rope_dim, per_row):
    """apply_rope's Triton kernel (on CUDA) against its PyTorch path (run on CPU copies): output and gradient, on q
    laid out as the attention block holds it, full and partial rotary, one table or one per row (documents)."""
    from blocks.attention import apply_rope, rope_cos_sin
    from blocks.ops import rope_triton

    x = torch.randn(2, 300, 8 * 64, device="cuda", dtype=dtype).view(2, 300, 8, 64).transpose(1, 2).requires_grad_()
    pos = torch.randint(0, 4096, (2, 1, 300), device="cuda") if per_row else torch.arange(100, 400, device="cuda")
    cos, sin = rope_cos_sin(pos, rope_dim, 10000.0)
    x_cpu = x.detach().cpu().requires_grad_()
    ref, got = apply_rope(x_cpu, cos.cpu(), sin.cpu()), apply_rope(x, cos, sin)
    assert torch.equal(got, rope_triton.rope(x, cos, sin, False))  # apply_rope takes the kernel on CUDA
    dy = torch.randn(ref.shape).to(dtype)
    (g_ref,), (g_got,) = torch.autograd.grad(ref, x_cpu, dy), torch.autograd.grad(got, x, dy.cuda())
    errors = {"out": max_rel(got.float().cpu(), ref.float()), "grad": max_rel(g_got.float().cpu(), g_ref.float())}
    report(f"rope {rope_dim} per_row={per_row}", dtype, errors)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # both in fp32, rounded once to dtype (bf16: a flip at most)
    assert errors["out"] < tol and errors["grad"] < tol, errors
