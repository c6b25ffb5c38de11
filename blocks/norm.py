"""RMSNorm and the gated, grouped RMSNorms of Mamba2 and its variants (computed in fp32, as HF and the kernels do)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blocks.ops.norm import gated_rms_norm, rms_norm


class RMSNorm(nn.Module):
    """weight * x / rms(x); `backend` as the ops' (auto: mamba-ssm's fused kernel on CUDA when it imports)."""

    def __init__(self, dim: int, eps: float = 1e-5, backend: str = "auto"):
        super().__init__()
        self.eps, self.backend = eps, backend
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.backend)


GATE_NORMS = ("gated", "norm_first", "none")


class GatedRMSNorm(nn.Module):
    """rmsnorm(x * silu(z)) normalised within groups of `group_size` channels (Mamba2, ngroups > 1).

    norm_first=True: rmsnorm(x) * silu(z) instead (Falcon-H1's mamba_norm_before_gate).
    """

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5, norm_first: bool = False,
                 backend: str = "auto"):
        super().__init__()
        self.eps, self.group_size, self.norm_first, self.backend = eps, group_size, norm_first, backend
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return gated_rms_norm(x, z, self.weight, self.eps, self.group_size, self.norm_first, self.backend)


class SiluGate(nn.Module):
    """x * silu(z) without a norm (Falcon-H1 with mamba_rms_norm=False)."""

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return x if z is None else (x.float() * F.silu(z.float())).to(x.dtype)


def gate_norm(kind: str, dim: int, group_size: int, eps: float, backend: str = "auto") -> nn.Module:
    """The output gate of a Mamba2 mixer: "gated" rmsnorm(x * silu(z)), "norm_first" rmsnorm(x) * silu(z),
    "none" x * silu(z)."""
    if kind == "none":
        return SiluGate()
    return GatedRMSNorm(dim, group_size, eps, norm_first=kind == "norm_first", backend=backend)
