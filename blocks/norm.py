"""RMSNorm and the gated, grouped RMSNorm of Mamba2 (computed in fp32, as HF and the kernels do)."""

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


class GatedRMSNorm(nn.Module):
    """rmsnorm(x * silu(z)) normalised within groups of `group_size` channels (Mamba2, ngroups > 1)."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps, self.group_size = eps, group_size
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        x32 = x.float()
        if z is not None:
            x32 = x32 * F.silu(z.float())
        groups = x32.unflatten(-1, (-1, self.group_size))  # (..., G, group_size)
        groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * groups.flatten(-2).to(x.dtype)
