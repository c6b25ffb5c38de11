"""Mamba (v1) mixer, including Zamba's multi-head variant and Jamba's inner norms.

With n_heads > 1 (Zamba's n_mamba_heads) the d_inner channels split into heads, each with its own
x_proj and dt_proj: n_heads independent selective scans, run as one grouped scan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from blocks import ops
from blocks.base import Block, BlockConfig, RecurrentCache, check, linear_flops, project, state_dtype, upcast
from blocks.norm import RMSNorm
from blocks.ops.backend import check_backend
from blocks.registry import register


@dataclass
class MambaConfig(BlockConfig):
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None  # None: ceil(d_model / 16)
    n_heads: int = 1  # Zamba's n_mamba_heads
    inner_norms: bool = False  # Jamba: RMSNorm on dt, B and C
    conv_bias: bool = True
    bias: bool = False
    norm_eps: float = 1e-6
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    backend: str = "auto"
    out_proj: bool = True  # False: return the d_inner-wide scan output (a parallel layer projects it)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dt_rank is None:
            self.dt_rank = math.ceil(self.d_model / 16)
        check(self.d_state > 0 and self.d_conv > 0 and self.expand > 0 and self.dt_rank > 0,
              "mamba: d_state, d_conv, expand and dt_rank must be positive")
        check(self.d_inner % self.n_heads == 0,
              f"mamba: d_inner = expand * d_model = {self.d_inner} is not divisible by n_heads = {self.n_heads}")
        check_backend(self.backend)

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model


@register("mamba", "M", MambaConfig, kind="mixer")
class Mamba(Block):
    def __init__(self, config: MambaConfig):
        super().__init__(config)
        c = config
        d_inner, heads, k = c.d_inner, c.n_heads, c.d_inner // c.n_heads
        self.in_proj = nn.Linear(c.d_model, 2 * d_inner, bias=c.bias)  # [x, z]
        self.conv1d = nn.Conv1d(d_inner, d_inner, c.d_conv, groups=d_inner, bias=c.conv_bias)
        self.x_proj = nn.Parameter(torch.empty(heads, c.dt_rank + 2 * c.d_state, k))  # per head: k -> [dt, B, C]
        self.dt_proj = nn.Parameter(torch.empty(heads, k, c.dt_rank))  # per head: dt_rank -> k
        self.dt_bias = nn.Parameter(torch.empty(d_inner))
        self.A_log = nn.Parameter(torch.empty(d_inner, c.d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.out_proj = nn.Linear(d_inner, c.d_model, bias=c.bias) if c.out_proj else None
        self.inner_norms = nn.ModuleList(
            [RMSNorm(n, c.norm_eps, c.backend) for n in (c.dt_rank, c.d_state, c.d_state)] if c.inner_norms else []
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba's initialisation: S4D-real A, dt log-uniform in [dt_min, dt_max] through the bias."""
        c = self.config
        k = c.d_inner // c.n_heads
        nn.init.uniform_(self.x_proj, -k**-0.5, k**-0.5)
        nn.init.uniform_(self.dt_proj, -c.dt_rank**-0.5, c.dt_rank**-0.5)
        dt = torch.exp(torch.rand(c.d_inner) * (math.log(c.dt_max) - math.log(c.dt_min)) + math.log(c.dt_min))
        dt = dt.clamp(min=c.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log.copy_(torch.log(torch.arange(1, c.d_state + 1, dtype=torch.float32)).expand(c.d_inner, -1))
        self.D.fill_(1.0)

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        """mamba-ssm's initialisation, not N(0, std): in_proj and out_proj keep PyTorch's default (as
        mamba-ssm's MixerModel leaves them), biases zero, SSM parameters as `reset_parameters` set them.

        The output is gated (silu(x) * silu(z)), so it shrinks with the square of the projections' scale:
        with N(0, 0.02) a narrow Mamba is nearly the identity at init, and a tied LM head then gives the
        input token most of the probability (zamba-tiny: loss 4.35 for predicting the current token,
        against 5.32 with this init and ln(256) = 5.55 for no preference).
        """
        for linear in filter(None, (self.in_proj, self.out_proj)):
            linear.reset_parameters()
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def _ssm_params(self, x: torch.Tensor):
        """x: (B, d_inner, L) after the conv -> delta (B, d_inner, L), B and C (B, heads, N, L)."""
        c = self.config
        xh = rearrange(x, "b (g k) l -> b g k l", g=c.n_heads)
        dbc = torch.einsum("bgkl,grk->bglr", xh, self.x_proj.to(x.dtype))
        dt, B, C = dbc.split([c.dt_rank, c.d_state, c.d_state], dim=-1)  # (B, G, L, .)
        if self.inner_norms:
            dt, B, C = (norm(t) for norm, t in zip(self.inner_norms, (dt, B, C), strict=True))
        delta = torch.einsum("bglr,gkr->bgkl", dt, self.dt_proj.to(x.dtype))
        return rearrange(delta, "b g k l -> b (g k) l"), B.transpose(-1, -2), C.transpose(-1, -2)

    def forward(self, x: torch.Tensor, cache: RecurrentCache | None = None, doc_ids: torch.Tensor | None = None,
                **context) -> torch.Tensor:
        """x: (B, L, d_model) -> (B, L, d_model); doc_ids (B, L): conv and scan reset at document starts."""
        c = self.config
        xs, z = rearrange(self.in_proj(x), "b l d -> b d l").chunk(2, dim=1)  # (B, d_inner, L) each
        if cache is not None:
            cache.conv.copy_(ops.conv_state_from(xs, c.d_conv))
        xs = ops.causal_conv1d(xs, self.conv1d.weight[:, 0], self.conv1d.bias, "silu", backend=c.backend,
                               doc_ids=doc_ids)
        delta, B, C = self._ssm_params(xs)
        A = -torch.exp(upcast(self.A_log))
        out = ops.selective_scan(xs, delta, A, B, C, upcast(self.D), z, upcast(self.dt_bias),
                                 delta_softplus=True, return_final_state=cache is not None, backend=c.backend,
                                 doc_ids=doc_ids)
        if cache is not None:
            out, state = out
            cache.ssm.copy_(state)
        return project(self.out_proj, rearrange(out, "b d l -> b l d"))

    def allocate_cache(self, batch, max_seqlen, device=None, dtype=None) -> RecurrentCache:
        c = self.config
        dtype = dtype or self.in_proj.weight.dtype
        return RecurrentCache(
            conv=torch.zeros(batch, c.d_inner, c.d_conv, device=device, dtype=dtype),
            ssm=torch.zeros(batch, c.d_inner, c.d_state, device=device, dtype=state_dtype(dtype)),
        )

    def step(self, x: torch.Tensor, cache: RecurrentCache, **context) -> torch.Tensor:
        c = self.config
        xs, z = self.in_proj(x[:, 0]).chunk(2, dim=-1)  # (B, d_inner)
        xs = ops.causal_conv1d_update(xs, cache.conv, self.conv1d.weight[:, 0], self.conv1d.bias, "silu",
                                      backend=c.backend)
        delta, B, C = self._ssm_params(xs[..., None])
        A = -torch.exp(upcast(self.A_log))
        y = ops.selective_state_update(cache.ssm, xs, delta[..., 0], A, B[..., 0], C[..., 0], upcast(self.D),
                                       z, upcast(self.dt_bias), dt_softplus=True, backend=c.backend)
        return project(self.out_proj, y)[:, None]

    def cache_bytes(self, batch, seq_len, dtype=torch.bfloat16) -> dict[str, int]:
        c = self.config
        conv = batch * c.d_inner * c.d_conv * dtype.itemsize
        return {"kv": 0, "state": conv + batch * c.d_inner * c.d_state * state_dtype(dtype).itemsize}

    def flops_per_token(self, seq_len: int) -> int:
        c = self.config
        projections = 2 * c.d_inner * (c.dt_rank + 2 * c.d_state) + 2 * c.d_inner * c.dt_rank
        # scan per (channel, state): delta*B*u, a*h + b, C.h: three multiply-adds.
        return linear_flops(self.in_proj, self.out_proj) + projections + 2 * c.d_inner * c.d_conv \
            + 6 * c.d_inner * c.d_state
