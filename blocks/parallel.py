"""A parallel layer: several mixers over the same input, their outputs normalised and averaged (Hymba).

    y = out_proj( mean_i( beta_i * rmsnorm(branch_i(x)) ) )

beta_i is the learnable per-channel weight of branch i's RMSNorm. With project="shared" (Hymba) the
branches stop before their own output projections and one Linear projects their common inner width
(attention: n_heads * v_head_dim, Mamba: expand * d_model) to d_model; with project="branch" each branch
keeps its projection to d_model and the layer adds none. Falcon-H1 sums its branches unnormalised:
norm=False drops the branch norms (beta_i = 1) and reduce="sum" adds instead of averaging. Layouts write it
as "(A|M2)"; it registers as "parallel" (kind "parallel") so that its options live under blocks.parallel,
but "P" alone is no layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from blocks import registry
from blocks.base import Block, BlockConfig, Cache, ConfigError, check, linear_flops, project
from blocks.norm import RMSNorm
from blocks.registry import register

PROJECT = ("shared", "branch")
REDUCE = ("mean", "sum")


@dataclass
class ParallelConfig(BlockConfig):
    project: str = "shared"  # "shared": one output projection after the mean (Hymba); "branch": each branch's own
    norm_eps: float = 1e-6
    bias: bool = False
    norm: bool = True  # False: no RMSNorm on the branch outputs (Falcon-H1)
    reduce: str = "mean"  # "mean" (Hymba) or "sum" (Falcon-H1) of the branch outputs

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.project in PROJECT, f"parallel: project must be one of {', '.join(PROJECT)}, got {self.project!r}")
        check(self.reduce in REDUCE, f"parallel: reduce must be one of {', '.join(REDUCE)}, got {self.reduce!r}")


@dataclass
class ParallelCache(Cache):
    """One cache per branch (KV caches and recurrent states side by side)."""

    branches: list[Cache | None]

    def tensors(self) -> list[torch.Tensor]:
        return [t for c in self.branches if c is not None for t in c.tensors()]

    def nbytes_by_kind(self) -> dict[str, int]:
        out = {"kv": 0, "state": 0}
        for c in filter(None, self.branches):
            for kind, n in c.nbytes_by_kind().items():
                out[kind] += n
        return out


@register("parallel", "P", ParallelConfig, kind="parallel")
class Parallel(Block):
    """The branches run on the same (already normed) input; see the module docstring for the combination."""

    def __init__(self, config: ParallelConfig, branches: Sequence[Block]):
        super().__init__(config)
        c = config
        label = "(" + "|".join(b.symbol for b in branches) + ")"
        check(len(branches) >= 2, f"parallel layer {label}: needs at least two branches")
        check(all(b.kind == "mixer" for b in branches), f"parallel layer {label}: every branch must be a mixer")
        widths = [b.config.d_inner for b in branches] if c.project == "shared" else [c.d_model] * len(branches)
        check(len(set(widths)) == 1,
              f"parallel layer {label}: one output projection needs equally wide branch outputs, got "
              + ", ".join(f"{b.symbol} {w}" for b, w in zip(branches, widths, strict=True))
              + "; make them equal (e.g. blocks.attention.v_head_dim) or set blocks.parallel.project=branch")
        self.branches = nn.ModuleList(branches)
        self.norms = nn.ModuleList([RMSNorm(w, c.norm_eps) for w in widths]) if c.norm else None
        self.out_proj = nn.Linear(widths[0], c.d_model, bias=c.bias) if c.project == "shared" else None

    @classmethod
    def build(cls, config: ParallelConfig, symbols: Sequence[str], make: Callable[..., Block]) -> Parallel:
        """The layer with one branch per symbol; `make(symbol, **fixed)` builds a block with its configured options.

        Raises:
            ConfigError: a branch that is no mixer, or (project="shared") one without an out_proj option.
        """
        fixed = {"out_proj": False} if config.project == "shared" else {}
        for symbol in symbols:
            entry = registry.get(symbol)
            fields = {f.name for f in dataclasses.fields(entry.config_cls)}
            if fixed and not ("out_proj" in fields and hasattr(entry.config_cls, "d_inner")):
                raise ConfigError(f"parallel layer: {entry.name} ({symbol}) cannot leave out its output projection "
                                  "to share one; set blocks.parallel.project=branch")
        return cls(config, [make(symbol, **fixed) for symbol in symbols])

    def forward(self, x: torch.Tensor, cache: ParallelCache | None = None, **context) -> torch.Tensor:
        """x: (B, T, d_model) -> (B, T, d_model); with a cache, each branch fills its own."""
        caches = cache.branches if cache is not None else [None] * len(self.branches)
        return self._combine([b(x, c, **context) for b, c in zip(self.branches, caches, strict=True)])

    def step(self, x: torch.Tensor, cache: ParallelCache, **context) -> torch.Tensor:
        return self._combine([b.step(x, c, **context) for b, c in zip(self.branches, cache.branches, strict=True)])

    def _combine(self, outs: list[torch.Tensor]) -> torch.Tensor:
        if self.norms is not None:
            outs = [norm(o) for norm, o in zip(self.norms, outs, strict=True)]
        y = sum(outs)
        return project(self.out_proj, y / len(outs) if self.config.reduce == "mean" else y)

    def allocate_cache(self, batch, max_seqlen, device=None, dtype=None) -> ParallelCache:
        return ParallelCache([b.allocate_cache(batch, max_seqlen, device, dtype) for b in self.branches])

    def cache_bytes(self, batch, seq_len, dtype=torch.bfloat16) -> dict[str, int]:
        out = {"kv": 0, "state": 0}
        for branch in self.branches:
            for kind, n in branch.cache_bytes(batch, seq_len, dtype).items():
                out[kind] += n
        return out

    def flops_per_token(self, seq_len: int) -> int:
        return sum(b.flops_per_token(seq_len) for b in self.branches) + linear_flops(self.out_proj)

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        """Each branch as it initialises itself; the shared output projection N(0, std), bias zero."""
        for branch in self.branches:
            branch.init_weights(std)
        if self.out_proj is not None:
            nn.init.normal_(self.out_proj.weight, 0.0, std)
            if self.out_proj.bias is not None:
                nn.init.zeros_(self.out_proj.bias)
