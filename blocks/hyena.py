"""Hyena operator (Poli et al. 2023; HazyResearch/safari's HyenaOperator), the mixer of StripedHyena's gated
convolution blocks.

in_proj to order + 1 streams [x_0, ..., x_{order-1}, v] -> short depthwise causal conv over all of them ->
for i = order-1 .. 1: v = x_i * v, then v = h_i * v + D_i v (a long causal convolution by FFT) -> y = x_0 * v
-> out_proj. The long filters are implicit: a small MLP with sine activations maps positional features of
t (t itself and sin/cos bands) to one tap per channel, then an exponential decay (a different rate per
channel) modulates it. The features use the time scale l_max, so a filter never depends on the sequence
length: a prefix of a longer sequence sees the same taps.

Generation cache (`HyenaCache`): the short conv's last d_conv inputs, every input the long convolutions
have read so far (order - 1 streams of d_model channels, O(L) like a KV cache) and the filter taps
themselves (computed once, at prefill or the first step; shared by the batch). A step costs O(L d_model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from blocks import ops
from blocks.base import Block, BlockConfig, Cache, check, linear_flops, state_dtype
from blocks.ops.fft_conv import causal_conv_step, fft_causal_conv, fft_flops_per_token
from blocks.registry import register


@dataclass
class HyenaConfig(BlockConfig):
    order: int = 2  # gates; order + 1 streams, order - 1 long convolutions
    d_conv: int = 3  # the short filter's length
    filter_order: int = 64  # width of the filter MLP
    filter_layers: int = 2  # hidden Linear + sine layers of the filter MLP
    emb_dim: int = 3  # positional features: t and (emb_dim - 1) / 2 sin/cos bands
    l_max: int = 2048  # time scale of the positional features and of the decay
    sin_freq: float = 1.0  # initial frequency of the sine activations (learned per unit)
    fast_decay_pct: float = 0.3
    slow_decay_pct: float = 1.5
    decay_target: float = 1e-2  # the modulation decays to this at fast_decay_pct * l_max (fastest channel)
    modulation_shift: float = 0.0
    bias: bool = True
    conv_bias: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.order >= 2, f"hyena: order must be at least 2, got {self.order}")
        check(self.d_conv > 0 and self.filter_order > 0 and self.filter_layers >= 0,
              "hyena: d_conv and filter_order must be positive, filter_layers non-negative")
        check(self.emb_dim >= 3 and self.emb_dim % 2 == 1,
              f"hyena: emb_dim must be odd and at least 3 (t plus sin/cos bands), got {self.emb_dim}")
        check(self.l_max >= 2, f"hyena: l_max must be at least 2, got {self.l_max}")
        check(0 < self.decay_target < 1 and self.fast_decay_pct > 0 and self.slow_decay_pct > 0,
              "hyena: decay_target must lie in (0, 1) and the decay percentages be positive")

    @property
    def n_filters(self) -> int:
        """Channels of all long filters together: (order - 1) * d_model."""
        return (self.order - 1) * self.d_model


class Sine(nn.Module):
    """sin(freq * x) with a learned frequency per unit."""

    def __init__(self, dim: int, freq: float):
        super().__init__()
        self.freq = nn.Parameter(torch.full((dim,), float(freq)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class ImplicitFilter(nn.Module):
    """Taps h[c, t] = MLP(features(t))[c] * (exp(-rate_c * t / (l_max - 1)) + shift), t = 0 .. L - 1."""

    def __init__(self, c: HyenaConfig):
        super().__init__()
        self.config = c
        layers = [nn.Linear(c.emb_dim, c.filter_order), Sine(c.filter_order, c.sin_freq)]
        for _ in range(c.filter_layers):
            layers += [nn.Linear(c.filter_order, c.filter_order), Sine(c.filter_order, c.sin_freq)]
        layers.append(nn.Linear(c.filter_order, c.n_filters, bias=False))
        self.mlp = nn.Sequential(*layers)

    def features(self, length: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """t / (l_max - 1) (L, 1) and the features [t, cos(f w), -sin(f w)] (L, emb_dim), w = 2 pi pos / l_max."""
        c = self.config
        pos = torch.arange(length, device=device, dtype=dtype)[:, None]
        t = pos / (c.l_max - 1)
        bands = (c.emb_dim - 1) // 2
        f = torch.linspace(1e-4, bands - 1, bands, device=device, dtype=dtype)
        w = 2 * math.pi * pos / c.l_max
        return t, torch.cat([t, torch.cos(f * w), -torch.sin(f * w)], dim=-1)

    def forward(self, length: int) -> torch.Tensor:
        """The taps (n_filters, length) in fp32 (or the weights' dtype if wider)."""
        c = self.config
        weight = self.mlp[0].weight
        dtype = state_dtype(weight.dtype)
        t, h = self.features(length, weight.device, dtype)
        for layer in self.mlp:  # in fp32 even for a bf16 model: the taps feed an FFT over the whole sequence
            if isinstance(layer, Sine):
                h = torch.sin(layer.freq.to(dtype) * h)
            else:
                h = F.linear(h, layer.weight.to(dtype), layer.bias.to(dtype) if layer.bias is not None else None)
        rates = torch.linspace(math.log(c.decay_target) / c.slow_decay_pct, math.log(c.decay_target) / c.fast_decay_pct,
                               c.n_filters, device=weight.device, dtype=dtype).abs()
        h = h * (torch.exp(-t * rates) + c.modulation_shift)
        return h.transpose(0, 1)


@dataclass
class HyenaCache(Cache):
    """Hyena's generation state; every tensor counts toward `nbytes` (see the module docstring)."""

    conv: torch.Tensor  # (B, (order + 1) * d_model, d_conv), the short conv's last inputs
    history: torch.Tensor  # (B, order - 1, d_model, max_seqlen), the long convolutions' inputs so far
    filters: torch.Tensor  # (order - 1, d_model, max_seqlen) fp32, the long filters' taps
    length: int = 0
    filters_ready: bool = False


@register("hyena", "H", HyenaConfig, kind="mixer")
class Hyena(Block):
    static_step = False  # its cache counts positions in a Python int

    def __init__(self, config: HyenaConfig):
        super().__init__(config)
        c = config
        streams = (c.order + 1) * c.d_model
        self.in_proj = nn.Linear(c.d_model, streams, bias=c.bias)
        self.conv1d = nn.Conv1d(streams, streams, c.d_conv, groups=streams, bias=c.conv_bias)
        self.filter = ImplicitFilter(c)
        self.D = nn.Parameter(torch.randn(c.order - 1, c.d_model))  # the long convolutions' skip
        self.out_proj = nn.Linear(c.d_model, c.d_model, bias=c.bias)

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        """in_proj and out_proj N(0, std), biases zero; the filter MLP keeps PyTorch's default: at N(0, 0.02)
        its four layers would shrink the taps to ~1e-6 and leave the long convolution silent."""
        for linear in (self.in_proj, self.out_proj):
            nn.init.normal_(linear.weight, 0.0, std)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def _filters(self, length: int) -> torch.Tensor:
        return self.filter(length).unflatten(0, (self.config.order - 1, self.config.d_model))  # (order-1, D, L)

    def forward(self, x: torch.Tensor, cache: HyenaCache | None = None, doc_ids: torch.Tensor | None = None,
                **context) -> torch.Tensor:
        """x: (B, L, d_model) -> (B, L, d_model); doc_ids (B, L): no short or long conv tap crosses a document
        start."""
        c = self.config
        length = x.shape[1]
        u = rearrange(self.in_proj(x), "b l d -> b d l")
        if cache is not None:
            self._start(cache, length)
            cache.conv.copy_(ops.conv_state_from(u, c.d_conv))
        u = ops.causal_conv1d(u, self.conv1d.weight[:, 0], self.conv1d.bias, None, backend="torch", doc_ids=doc_ids)
        *xs, v = u.split(c.d_model, dim=1)  # (B, D, L) each
        h = cache.filters if cache is not None else self._filters(length)
        for i in range(c.order - 1):
            v = xs[c.order - 1 - i] * v
            if cache is not None:
                cache.history[:, i, :, :length] = v
            v = (fft_causal_conv(v, h[i], doc_ids) + self.D[i, :, None] * v).to(x.dtype)
        return self.out_proj(rearrange(xs[0] * v, "b d l -> b l d"))

    def _start(self, cache: HyenaCache, length: int) -> None:
        if length > cache.history.shape[-1]:
            raise ValueError(f"Hyena cache holds {cache.history.shape[-1]} positions, asked to fill {length}")
        if not cache.filters_ready:
            cache.filters.copy_(self._filters(cache.filters.shape[-1]))
            cache.filters_ready = True
        cache.length = length

    def allocate_cache(self, batch, max_seqlen, device=None, dtype=None) -> HyenaCache:
        c = self.config
        dtype = dtype or self.in_proj.weight.dtype
        return HyenaCache(
            conv=torch.zeros(batch, (c.order + 1) * c.d_model, c.d_conv, device=device, dtype=dtype),
            history=torch.zeros(batch, c.order - 1, c.d_model, max_seqlen, device=device, dtype=dtype),
            filters=torch.zeros(c.order - 1, c.d_model, max_seqlen, device=device, dtype=state_dtype(dtype)),
        )

    def step(self, x: torch.Tensor, cache: HyenaCache, **context) -> torch.Tensor:
        c = self.config
        position = cache.length
        self._start(cache, position + 1)
        u = ops.causal_conv1d_update(self.in_proj(x[:, 0]), cache.conv, self.conv1d.weight[:, 0], self.conv1d.bias,
                                     None, backend="torch")
        *xs, v = u.split(c.d_model, dim=-1)  # (B, D) each
        for i in range(c.order - 1):
            v = xs[c.order - 1 - i] * v
            cache.history[:, i, :, position] = v
            v = (causal_conv_step(cache.history[:, i], cache.filters[i], position + 1)
                 + self.D[i] * v).to(x.dtype)
        return self.out_proj(xs[0] * v)[:, None]

    def cache_bytes(self, batch, seq_len, dtype=torch.bfloat16) -> dict[str, int]:
        """All of it is "state" (not an attention KV cache), but history and filters grow with seq_len."""
        c = self.config
        conv = batch * (c.order + 1) * c.d_model * c.d_conv * dtype.itemsize
        history = batch * c.n_filters * seq_len * dtype.itemsize
        filters = c.n_filters * seq_len * state_dtype(dtype).itemsize
        return {"kv": 0, "state": conv + history + filters}

    def flops_per_token(self, seq_len: int) -> int:
        """Projections, the short conv, the long convolutions by FFT (`fft_flops_per_token`) and the filter
        MLP (run once per sequence, for all seq_len positions: counted per token at batch 1)."""
        c = self.config
        mlp = linear_flops(*(m for m in self.filter.mlp if isinstance(m, nn.Linear)))
        short = 2 * (c.order + 1) * c.d_model * c.d_conv
        return linear_flops(self.in_proj, self.out_proj) + short + c.n_filters * fft_flops_per_token(seq_len) + mlp
