"""PyTorch chunked gated delta rule vs flash-linear-attention's kernel on CUDA: outputs, final state and every
gradient, fp32 and bf16; and the one-time fallback where fla cannot serve.

Run on a GPU machine with flash-linear-attention installed: `pytest -m gpu tests/test_gpu_fla.py`. The parity
tests skip, saying why, where fla does not import or refuses the GPU (Hopper with Triton < 3.7.1).
With HYBRIDS_GPU_REPORT=path, each parity test appends its largest relative errors to that JSON-lines file.
"""

import logging

import pytest
import torch
import torch.nn.functional as F

from blocks import ops
from blocks.gated_deltanet import GatedDeltaNet, GatedDeltaNetConfig
from blocks.ops import fla_kernels
from tests.test_gpu import compare

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def refusal() -> str | None:
    return fla_kernels._device_refusal(torch.cuda.current_device())


def needs_fla():
    if (reason := refusal()) is not None:
        pytest.skip(reason)


def delta_inputs(b=2, length=1000, heads=4, d_k=64, d_v=128, dtype=torch.float32):
    kw = dict(device="cuda", dtype=torch.float32)
    q = F.normalize(torch.randn(b, length, heads, d_k, **kw), dim=-1)
    k = F.normalize(torch.randn(b, length, heads, d_k, **kw), dim=-1)
    v = torch.randn(b, length, heads, d_v, **kw)
    g = -F.softplus(torch.randn(b, length, heads, **kw))
    beta = torch.rand(b, length, heads, **kw)
    h0 = torch.randn(b, heads, d_k, d_v, **kw)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)] + [t.requires_grad_() for t in (g, beta, h0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [1000, 2048])
def test_gated_delta_rule_torch_vs_fla(dtype, length):
    needs_fla()
    inputs = delta_inputs(length=length, dtype=dtype)
    q, k, v, g, beta, h0 = inputs
    kw = dict(chunk_size=64, initial_state=h0, return_final_state=True)
    t_out = ops.gated_delta_rule(q, k, v, g, beta, backend="torch", **kw)
    f_out = ops.gated_delta_rule(q, k, v, g, beta, backend="fla", **kw)
    compare(f"gated_delta_rule L{length}", dtype, t_out, f_out, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_deltanet_block_torch_vs_fla(dtype):
    needs_fla()
    block = GatedDeltaNet(GatedDeltaNetConfig(d_model=256, n_heads=4, backend="torch")).cuda().to(dtype)
    x = torch.randn(2, 1024, 256, device="cuda", dtype=dtype, requires_grad=True)
    t_out = block(x)
    block.config.backend = "fla"
    f_out = block(x)
    compare("gated_deltanet block", dtype, (t_out,), (f_out,), [x, *block.parameters()], grad_outputs=1)


def test_auto_falls_back_with_one_warning_where_fla_cannot_serve(caplog):
    reason = refusal()
    if reason is None:
        assert fla_kernels.resolve("auto", torch.device("cuda")) == "fla"
        return
    fla_kernels.warn_fallback.cache_clear()
    with caplog.at_level(logging.WARNING, logger="hybrids"):
        assert [fla_kernels.resolve("auto", torch.device("cuda")) for _ in range(3)] == ["torch"] * 3
    assert len([r for r in caplog.records if reason in r.getMessage()]) == 1
