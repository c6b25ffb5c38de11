"""RMSNorm and the gated, grouped RMSNorms of Mamba2 and its variants (computed in fp32, as HF and the kernels do)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


GATE_NORMS = ("gated", "norm_first", "none")


class GatedRMSNorm(nn.Module):
    """rmsnorm(x * silu(z)) normalised within groups of `group_size` channels (Mamba2, ngroups > 1).

    norm_first=True: rmsnorm(x) * silu(z) instead (Falcon-H1's mamba_norm_before_gate).
    """

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5, norm_first: bool = False):
        super().__init__()
        self.eps, self.group_size, self.norm_first = eps, group_size, norm_first
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        x32 = x.float()
        if z is not None and not self.norm_first:
            x32 = x32 * F.silu(z.float())
        groups = x32.unflatten(-1, (-1, self.group_size))  # (..., G, group_size)
        groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.weight * groups.flatten(-2)
        if z is not None and self.norm_first:
            y = y * F.silu(z.float())
        return y.to(x.dtype)


class SiluGate(nn.Module):
    """x * silu(z) without a norm (Falcon-H1 with mamba_rms_norm=False)."""

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return x if z is None else (x.float() * F.silu(z.float())).to(x.dtype)


def gate_norm(kind: str, dim: int, group_size: int, eps: float) -> nn.Module:
    """The output gate of a Mamba2 mixer: "gated" rmsnorm(x * silu(z)), "norm_first" rmsnorm(x) * silu(z),
    "none" x * silu(z)."""
    if kind == "none":
        return SiluGate()
    return GatedRMSNorm(dim, group_size, eps, norm_first=kind == "norm_first")
