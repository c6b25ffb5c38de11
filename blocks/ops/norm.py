"""RMSNorm and Mamba2's gated, grouped RMSNorm: the PyTorch path and mamba-ssm's fused Triton kernels.

Both compute in fp32, as HF and the kernels do. The kernels (`mamba_ssm.ops.triton.layer_norm` and
`layernorm_gated`) make one pass over the input forward and one backward, saving only the input and the per-row
inverse RMS. The PyTorch path launches about ten elementwise kernels each way; on CUDA it runs under activation
checkpointing, so that it too keeps only its inputs for backward (recomputing the rest) instead of about six fp32
intermediates per norm, several GiB over a model at 4 x 2048 tokens. Under `torch.compile` the plain PyTorch path
runs (Inductor fuses it and decides what to keep).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from blocks.ops import backend as _backend


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / rms(x) over the last dim; the normalised x is rounded to x's dtype before the weight."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def gated_rms_norm_torch(x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, eps: float,
                         group_size: int, norm_first: bool = False) -> torch.Tensor:
    """rmsnorm(x * silu(z)) within groups of `group_size` channels; norm_first: rmsnorm(x) * silu(z). x's dtype."""
    x32 = x.float()
    if z is not None and not norm_first:
        x32 = x32 * F.silu(z.float())
    groups = x32.unflatten(-1, (-1, group_size))  # (..., G, group_size)
    groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * groups.flatten(-2)
    if z is not None and norm_first:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


def _fused(backend: str, x: torch.Tensor) -> bool:
    if not x.is_cuda or torch.compiler.is_compiling():
        return False
    return _backend.resolve(backend, x.device) == "mamba_ssm"


def _lean(fn, x: torch.Tensor, *args):
    """fn(x, *args), recomputed in backward on CUDA (see the module docstring)."""
    if x.is_cuda and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return checkpoint(fn, x, *args, use_reentrant=False)
    return fn(x, *args)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    """`rms_norm_torch`, or mamba-ssm's fused kernel on CUDA. The kernel returns x's dtype, so it serves where
    that is the PyTorch path's result dtype too (x in fp32, or x and weight in one dtype)."""
    if _fused(backend, x) and torch.result_type(x, weight) == x.dtype:
        from mamba_ssm.ops.triton.layer_norm import rms_norm_fn

        return rms_norm_fn(x, weight, None, eps=eps)
    return _lean(rms_norm_torch, x, weight, eps)


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, eps: float, group_size: int,
                   norm_first: bool = False, backend: str = "auto") -> torch.Tensor:
    """`gated_rms_norm_torch`, or mamba-ssm's fused gated kernel on CUDA (x's dtype either way)."""
    if _fused(backend, x):
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn

        return rmsnorm_fn(x, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=norm_first)
    return _lean(gated_rms_norm_torch, x, z, weight, eps, group_size, norm_first)
