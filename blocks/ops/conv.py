"""Causal depthwise conv1d (the short convolution in front of Mamba's scan) and its step form."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from blocks.ops.documents import positions


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation in ("silu", "swish"):
        return F.silu(y)
    if activation is None:
        return y
    raise ValueError(f"conv activation must be 'silu', 'swish' or None, got {activation!r}")


def causal_conv1d_torch(x, weight, bias=None, activation=None, doc_ids=None):
    """y_t = sum_k weight[:, k] * x_{t-K+1+k} (+ bias), zero history.

    Args:
        x: (B, D, L). weight: (D, K). bias: (D,) or None. activation: "silu" or None.
        doc_ids: (B, L) document ids (see `blocks.ops.documents`) or None: taps that would reach into an
            earlier document read zeros, as at the start of a row.
    Returns:
        (B, D, L) in x's dtype.
    """
    k = weight.shape[-1]
    if doc_ids is not None:
        return _document_conv(x, weight, bias, activation, positions(doc_ids)[:, None])
    y = F.conv1d(F.pad(x, (k - 1, 0)), weight[:, None].to(x.dtype),
                 bias.to(x.dtype) if bias is not None else None, groups=x.shape[1])
    return _activate(y, activation)


def _document_conv(x, weight, bias, activation, position):
    """The causal conv as a sum over its K taps, tap s steps back kept where s <= the position in the document."""
    k, length = weight.shape[-1], x.shape[-1]
    xp, weight = F.pad(x, (k - 1, 0)), weight.to(x.dtype)
    y = sum(weight[:, j, None] * xp[..., j : j + length].masked_fill(position < k - 1 - j, 0) for j in range(k))
    if bias is not None:
        y = y + bias.to(x.dtype)[:, None]
    return _activate(y, activation)


def causal_conv1d_ref(x, weight, bias=None, activation=None):
    """Reference of `causal_conv1d_torch` written as a sum over taps (tests only)."""
    k, length = weight.shape[-1], x.shape[-1]
    xp = F.pad(x, (k - 1, 0))
    y = sum(weight[:, j, None] * xp[..., j : j + length] for j in range(k))
    if bias is not None:
        y = y + bias[:, None]
    return _activate(y, activation)


def conv_state_from(x: torch.Tensor, width: int) -> torch.Tensor:
    """The conv state after reading x (B, D, L): its last `width` inputs, zero-padded on the left."""
    return F.pad(x, (max(width - x.shape[-1], 0), 0))[..., -width:]


def causal_conv1d_update_torch(x, conv_state, weight, bias=None, activation=None):
    """One step: shift x (B, D) into conv_state (B, D, K) in place and return the conv output (B, D)."""
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[..., -1] = x
    y = (conv_state * weight.to(conv_state.dtype)).sum(-1)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return _activate(y, activation).to(x.dtype)
