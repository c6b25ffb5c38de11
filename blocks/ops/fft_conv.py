"""Long causal depthwise convolution (Hyena's implicit filters): by FFT, directly, and one step at a time.

    y[..., t] = sum_{s=0}^{t} h[..., s] * u[..., t - s]

with a filter h as long as the input. The FFT form zero-pads both to 2L so the circular convolution has no
wrap-around: O(L log L) per channel. Computed in fp32 (or wider) and returned in fp32 (or wider).

With document ids (`blocks.ops.documents`) each document is convolved alone: the documents of all rows are
gathered into a zero-padded (documents, D, longest document) batch, convolved by FFT and scattered back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

from blocks.ops.documents import positions, segments


def fft_causal_conv(u: torch.Tensor, h: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Causal convolution of u with h by FFT.

    Args:
        u: (..., D, L) input, (B, D, L) with doc_ids. h: (D, L') filter with L' >= L (only its first L taps
            are used). doc_ids: (B, L) document ids or None; no tap reaches into an earlier document.
    Returns:
        (..., D, L) in fp32 (float64 for float64 inputs).
    """
    if doc_ids is not None:
        return _document_conv(u, h, doc_ids)
    length = u.shape[-1]
    dtype = torch.promote_types(u.dtype, torch.float32)
    n = 2 * length
    spectrum = torch.fft.rfft(u.to(dtype), n=n) * torch.fft.rfft(h[..., :length].to(dtype), n=n)
    return torch.fft.irfft(spectrum, n=n)[..., :length]


def _document_conv(u: torch.Tensor, h: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """`fft_causal_conv` of every document alone; u: (B, D, L) -> (B, D, L)."""
    seg, pos = segments(doc_ids), positions(doc_ids)
    counts = seg[:, -1] + 1  # (B,) documents per row
    doc = (counts.cumsum(0) - counts)[:, None] + seg  # (B, L) index of each token's document among all rows
    docs = u.new_zeros(int(counts.sum()), int(pos.max()) + 1, u.shape[1])  # (N, longest, D)
    docs = docs.index_put((doc, pos), rearrange(u, "b d l -> b l d"))
    y = fft_causal_conv(rearrange(docs, "n l d -> n d l"), h)  # (N, D, longest)
    return rearrange(rearrange(y, "n d l -> n l d")[doc, pos], "b l d -> b d l")


def causal_conv_direct(u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Reference of `fft_causal_conv` as a direct (L x L) depthwise convolution (tests and benchmarks only)."""
    length, channels = u.shape[-1], u.shape[-2]
    dtype = torch.promote_types(u.dtype, torch.float32)
    weight = h[..., :length].to(dtype).flip(-1)[:, None]  # (D, 1, L): conv1d correlates, so flip the taps
    x = F.pad(u.to(dtype).reshape(-1, channels, length), (length - 1, 0))
    return F.conv1d(x, weight, groups=channels).reshape(u.shape)


def causal_conv_step(history: torch.Tensor, h: torch.Tensor, length: int) -> torch.Tensor:
    """The output at position length - 1 from the inputs so far.

    Args:
        history: (B, D, >= length) inputs u_0 .. u_{length-1} in its first `length` positions.
        h: (D, >= length) filter. length: positions seen, the new one included.
    Returns:
        (B, D) in fp32 (float64 for float64 inputs).
    """
    dtype = torch.promote_types(history.dtype, torch.float32)
    return (history[..., :length].to(dtype) * h[..., :length].to(dtype).flip(-1)).sum(-1)


def fft_flops_per_token(seq_len: int) -> int:
    """FLOPs per token and channel of `fft_causal_conv` at seq_len L: three real FFTs of 2L points
    (2.5 n log2 n each, half a complex FFT's 5 n log2 n) and the spectrum product (L + 1 complex
    products of 6 FLOPs), divided by the L tokens."""
    n = 2 * seq_len
    return round((3 * 2.5 * n * math.log2(n) + 6 * (seq_len + 1)) / seq_len)
