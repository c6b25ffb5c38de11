"""GPU speed paths (issue 10): the kernels as torch.library custom ops (opcheck, torch.compile vs eager), the CUDA
graph of the decoding step, the fused linear cross-entropy on CUDA. Run on a GPU machine: `pytest -m gpu`."""

import pytest
import torch
import torch.nn.functional as F

from blocks.ops.backend import importable
from hybrids.model import build
from hybrids.training.loss import fused_linear_cross_entropy
from tests.inputs import max_rel, selective_scan_inputs, ssd_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
kernels_needed = pytest.mark.skipif(not (torch.cuda.is_available() and importable("mamba_ssm")),
                                    reason="needs mamba_ssm")


@kernels_needed
@pytest.mark.parametrize("documents", [False, True], ids=["one-doc", "seq_idx"])
@pytest.mark.parametrize("gated", [False, True], ids=["no-z", "z"])
def test_ssd_custom_op_passes_opcheck(gated, documents):
    from blocks.ops import kernels

    x, dt, A, B, C, D, z, bias = ssd_inputs(b=2, length=300, heads=4, headdim=16, groups=1, n=16,
                                            dtype=torch.float32, device="cuda")
    doc_ids = (torch.arange(300, device="cuda") >= 170).expand(2, -1) if documents else None
    torch.library.opcheck(kernels.ssd_fwd, (x, dt, A, B, C, 64, D, z if gated else None, bias, None,
                                            kernels.seq_idx(doc_ids), True, 0.0, float("inf")))


@pytest.mark.parametrize("documents", [False, True], ids=["one-doc", "positions"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_triton_conv_custom_ops_pass_opcheck(bias, documents):
    """Their fakes give the real outputs' shapes, strides and dtypes (torch.compile checks them)."""
    from blocks.ops import conv_triton
    from blocks.ops.documents import positions

    x = torch.randn(2, 300, 8, device="cuda")  # (B, L, D): Mamba's xBC as the op sees it
    weight, b = torch.randn(8, 4, device="cuda"), torch.randn(8, device="cuda") if bias else None
    pos = positions((torch.arange(300, device="cuda") >= 170).expand(2, -1)) if documents else None
    torch.library.opcheck(conv_triton.conv1d_fwd, (x, weight, b, pos, True))
    torch.library.opcheck(conv_triton.conv1d_bwd, (torch.randn_like(x), x, weight, b, pos, True))


@kernels_needed
def test_selective_scan_and_state_update_custom_ops_pass_opcheck():
    from blocks.ops import kernels

    u, delta, A, B, C, D, z, bias = selective_scan_inputs(b=2, d=32, n=8, length=300, dtype=torch.float32,
                                                          device="cuda")
    torch.library.opcheck(kernels.selective_scan_fwd, (u, delta, A, B, C, D, z, bias, True))
    state = torch.randn(2, 4, 16, 8, device="cuda")
    x, dt = torch.randn(2, 4, 16, device="cuda"), torch.randn(2, 4, 16, device="cuda")
    A, dt_bias = -torch.rand(4, 16, 8, device="cuda"), torch.randn(4, 16, device="cuda")
    Bs = torch.randn(2, 1, 8, device="cuda")
    torch.library.opcheck(kernels.state_update, (state, x, dt, A, Bs, Bs, None, None, dt_bias, True))


@kernels_needed
@pytest.mark.parametrize("layout", ["(2M2:A*2)x2", "(2M:A*)x2"])
def test_compiled_model_with_kernels_equals_eager(layout):
    torch.manual_seed(0)
    model = build(layout, d_model=128, vocab_size=256, backend="mamba_ssm",
                  **{"blocks.mamba2.headdim": 32, "blocks.shared_attention.n_heads": 4}).cuda()
    ids = torch.randint(0, 256, (2, 256), device="cuda")
    eager = model(ids)
    eager_grads = torch.autograd.grad(eager.square().mean(), list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True)(ids)  # the kernels are custom ops: no graph break
    grads = torch.autograd.grad(compiled.square().mean(), list(model.parameters()))
    assert max_rel(compiled, eager) < 1e-4
    assert max(max_rel(g, e) for g, e in zip(grads, eager_grads, strict=True)) < 1e-3


@pytest.mark.parametrize("backend", ["torch", pytest.param("mamba_ssm", marks=kernels_needed)])
@pytest.mark.parametrize("recipe", ["zamba2-tiny", "llama-tiny"])
def test_cuda_graph_decoding_gives_the_tokens_of_dynamic_decoding(recipe, backend):
    model = build(recipe, backend=backend).cuda().eval()
    prompt = torch.randint(0, 256, (1, 37), device="cuda")
    for n in (2, 24):  # 2: the capture's warm-up steps must stay inside a cache of prompt + 2 positions
        tokens = {d: model.generate(prompt, n, decoding=d) for d in ("dynamic", "static", "cuda_graph")}
        assert torch.equal(tokens["cuda_graph"], tokens["dynamic"])
        assert torch.equal(tokens["static"], tokens["dynamic"])


@pytest.mark.parametrize("backend", ["torch", pytest.param("liger", marks=pytest.mark.skipif(
    not importable("liger_kernel"), reason="needs liger-kernel"))])
def test_fused_cross_entropy_on_cuda_under_autocast(backend):
    hidden = torch.randn(4, 512, 256, device="cuda", requires_grad=True)
    weight = (torch.randn(32000, 256, device="cuda") * 0.05).requires_grad_()
    targets = torch.randint(0, 32000, (4, 512), device="cuda").masked_fill(torch.rand(4, 512, device="cuda") < 0.3,
                                                                         -100)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = F.cross_entropy((hidden @ weight.T).float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        loss, correct = fused_linear_cross_entropy(hidden, weight, targets, backend=backend)
    ref_grads = torch.autograd.grad(ref, [hidden, weight])
    grads = torch.autograd.grad(loss, [hidden, weight])
    assert abs(loss.item() - ref.item()) < 1e-2 * ref.item()
    assert max(max_rel(g, r) for g, r in zip(grads, ref_grads, strict=True)) < 5e-2
    assert correct.shape == targets.shape and not correct[targets == -100].any()
