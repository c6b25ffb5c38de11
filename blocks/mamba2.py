"""Mamba2 mixer (SSD): scalar decay per head, ngroups shared B/C, gated grouped RMSNorm.

Projection layout follows mamba_ssm and HF Zamba2: in_proj -> [z, x, B, C, dt]; the causal conv
runs over [x, B, C].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from blocks import ops
from blocks.base import Block, BlockConfig, RecurrentCache, check, linear_flops, project, state_dtype, upcast
from blocks.norm import GATE_NORMS, gate_norm
from blocks.ops.backend import check_backend
from blocks.registry import register


@dataclass
class Mamba2Config(BlockConfig):
    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256  # the kernel's chunk; results do not depend on it
    conv_bias: bool = True
    bias: bool = False
    norm_eps: float = 1e-5
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit: tuple[float, float] = (0.0, float("inf"))
    A_init_range: tuple[float, float] = (1.0, 16.0)
    backend: str = "auto"
    out_proj: bool = True  # False: return the d_inner-wide scan output (a parallel layer projects it)
    d_ssm: int | None = None  # None: expand * d_model; else the inner width itself (Falcon-H1's mamba_d_ssm)
    gate_norm: str = "gated"  # "gated": rmsnorm(y * silu(z)); "norm_first": rmsnorm(y) * silu(z); "none": y * silu(z)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.d_ssm is None or self.d_ssm > 0, f"mamba2: d_ssm must be positive or None, got {self.d_ssm}")
        check(self.d_inner % self.headdim == 0,
              f"mamba2: d_inner = {self.d_inner} (d_ssm, or expand * d_model) is not divisible by headdim = "
              f"{self.headdim}")
        check(self.gate_norm in GATE_NORMS,
              f"mamba2: gate_norm must be one of {', '.join(GATE_NORMS)}, got {self.gate_norm!r}")
        check(self.n_heads % self.ngroups == 0,
              f"mamba2: n_heads = {self.n_heads} is not divisible by ngroups = {self.ngroups}")
        check(self.chunk_size > 0 and self.chunk_size & (self.chunk_size - 1) == 0,
              f"mamba2: chunk_size must be a power of two, got {self.chunk_size}")
        self.dt_limit = tuple(self.dt_limit)
        self.A_init_range = tuple(self.A_init_range)
        check_backend(self.backend)

    @property
    def d_inner(self) -> int:
        return self.d_ssm or self.expand * self.d_model

    @property
    def n_heads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ngroups * self.d_state



@torch.no_grad()
def init_decay(dt_bias: nn.Parameter, A_log: nn.Parameter, c) -> None:
    """Mamba2's per-head decay initialisation (Gated DeltaNet uses it too): A uniform in c.A_init_range,
    dt log-uniform in [c.dt_min, c.dt_max] and floored at c.dt_init_floor, stored as softplus^-1(dt)."""
    n = dt_bias.numel()
    dt = torch.exp(torch.rand(n) * (math.log(c.dt_max) - math.log(c.dt_min)) + math.log(c.dt_min))
    dt = dt.clamp(min=c.dt_init_floor)
    dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
    A_log.copy_(torch.log(torch.empty(n).uniform_(*c.A_init_range)))

@register("mamba2", "M2", Mamba2Config, kind="mixer")
class Mamba2(Block):
    def __init__(self, config: Mamba2Config):
        super().__init__(config)
        c = config
        self.in_proj = nn.Linear(c.d_model, c.d_inner + c.conv_dim + c.n_heads, bias=c.bias)
        self.conv1d = nn.Conv1d(c.conv_dim, c.conv_dim, c.d_conv, groups=c.conv_dim, bias=c.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(c.n_heads))
        self.A_log = nn.Parameter(torch.empty(c.n_heads))
        self.D = nn.Parameter(torch.empty(c.n_heads))
        self.norm = gate_norm(c.gate_norm, c.d_inner, c.d_inner // c.ngroups, c.norm_eps, c.backend)
        self.out_proj = nn.Linear(c.d_inner, c.d_model, bias=c.bias) if c.out_proj else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init_decay(self.dt_bias, self.A_log, self.config)
        self.D.fill_(1.0)

    def _split(self, zxbcdt: torch.Tensor):
        c = self.config
        return zxbcdt.split([c.d_inner, c.conv_dim, c.n_heads], dim=-1)

    def _scan_inputs(self, xbc: torch.Tensor):
        """(..., conv_dim) -> x (..., H, P), B and C (..., G, N)."""
        c = self.config
        x, B, C = xbc.split([c.d_inner, c.ngroups * c.d_state, c.ngroups * c.d_state], dim=-1)
        return (x.unflatten(-1, (c.n_heads, c.headdim)), B.unflatten(-1, (c.ngroups, c.d_state)),
                C.unflatten(-1, (c.ngroups, c.d_state)))

    def forward(self, x: torch.Tensor, cache: RecurrentCache | None = None, doc_ids: torch.Tensor | None = None,
                **context) -> torch.Tensor:
        """x: (B, L, d_model) -> (B, L, d_model); doc_ids (B, L): conv and SSD reset at document starts."""
        c = self.config
        z, xbc, dt = self._split(self.in_proj(x))
        xbc = rearrange(xbc, "b l d -> b d l")
        if cache is not None:
            cache.conv.copy_(ops.conv_state_from(xbc, c.d_conv))
        xbc = ops.causal_conv1d(xbc, self.conv1d.weight[:, 0], self.conv1d.bias, "silu", backend=c.backend,
                                doc_ids=doc_ids)
        xs, B, C = self._scan_inputs(rearrange(xbc, "b d l -> b l d"))
        A = -torch.exp(upcast(self.A_log))
        y = ops.ssd(xs, dt, A, B, C, c.chunk_size, D=upcast(self.D), dt_bias=upcast(self.dt_bias),
                    dt_softplus=True, return_final_states=cache is not None, dt_limit=c.dt_limit,
                    backend=c.backend, doc_ids=doc_ids)
        if cache is not None:
            y, state = y
            cache.ssm.copy_(state)
        return project(self.out_proj, self.norm(y.flatten(-2), z))

    def allocate_cache(self, batch, max_seqlen, device=None, dtype=None) -> RecurrentCache:
        c = self.config
        dtype = dtype or self.in_proj.weight.dtype
        return RecurrentCache(
            conv=torch.zeros(batch, c.conv_dim, c.d_conv, device=device, dtype=dtype),
            ssm=torch.zeros(batch, c.n_heads, c.headdim, c.d_state, device=device, dtype=state_dtype(dtype)),
        )

    def step(self, x: torch.Tensor, cache: RecurrentCache, **context) -> torch.Tensor:
        c = self.config
        z, xbc, dt = self._split(self.in_proj(x[:, 0]))
        xbc = ops.causal_conv1d_update(xbc, cache.conv, self.conv1d.weight[:, 0], self.conv1d.bias, "silu",
                                       backend=c.backend)
        xs, B, C = self._scan_inputs(xbc)
        A = -torch.exp(upcast(self.A_log))
        # dt is discretised here (not in the kernel) so that dt_limit applies exactly as in the scan.
        dt = F.softplus(upcast(dt) + upcast(self.dt_bias)).clamp(*c.dt_limit)
        y = ops.ssd_state_update(cache.ssm, xs, dt, A, B, C, D=upcast(self.D), backend=c.backend)
        return project(self.out_proj, self.norm(y.flatten(-2), z))[:, None]

    def cache_bytes(self, batch, seq_len, dtype=torch.bfloat16) -> dict[str, int]:
        c = self.config
        conv = batch * c.conv_dim * c.d_conv * dtype.itemsize
        return {"kv": 0, "state": conv + batch * c.n_heads * c.headdim * c.d_state * state_dtype(dtype).itemsize}

    def flops_per_token(self, seq_len: int) -> int:
        c = self.config
        # Chunked SSD per token (chunk T): C.B scores 2TN per group (shared by the group's heads, as in mamba-ssm's
        # kernels); per head scores.x 2TP, chunk state 2PN, carried-state read-out 2PN. Tokens of one chunk attend
        # to at most T = min(chunk, seq_len).
        # backend="torch" runs chunks of at most ops.TORCH_MAX_CHUNK; "auto" is counted as the CUDA kernel.
        chunk = min(c.chunk_size, ops.TORCH_MAX_CHUNK) if c.backend == "torch" else c.chunk_size
        T = min(chunk, seq_len)
        ssd = c.ngroups * 2 * T * c.d_state + c.n_heads * (2 * T * c.headdim + 4 * c.headdim * c.d_state)
        return linear_flops(self.in_proj, self.out_proj) + 2 * c.conv_dim * c.d_conv + ssd
