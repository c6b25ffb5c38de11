"""The causal depthwise conv of Mamba's mixers as Triton kernels, for CUDA where causal-conv1d is not installed.

Reads x in the layout the mixers hold it (channels last: the in_proj output, seen as (B, D, L) through a
transpose) and writes y the same way, so the PyTorch path's pad, layout copies and separate SiLU disappear: one
kernel forward, two backward (the SiLU's input is recomputed, not stored). Document starts (`doc_ids`) zero the taps
that would reach into an earlier document, as `conv.causal_conv1d_torch` does. The kernels are wrapped as
torch.library custom ops, so torch.compile traces around them. Imported only on CUDA (Triton comes with torch's
CUDA builds); TRITON_INTERPRET=1 runs them on CPU for tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_L, BLOCK_D = 64, 64


@triton.jit
def _tile(L, D, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's row, time and channel indices and their masks."""
    bi, lt, dt = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = lt * BLOCK_L + tl.arange(0, BLOCK_L)
    d = dt * BLOCK_D + tl.arange(0, BLOCK_D)
    return bi, t, d, t < L, d < D


@triton.jit
def _pre_activation(x_ptr, w_ptr, b_ptr, pos_ptr, bi, t, d, tmask, dmask, sxb, sxl, sxd, spb, spl,
                    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, BLOCK_L: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """sum_k w[d, k] * x[t - (K - 1 - k), d] (+ bias) in fp32 for a (BLOCK_L, BLOCK_D) tile."""
    acc = tl.zeros((BLOCK_L, BLOCK_D), tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    if HAS_POS:
        pos = tl.load(pos_ptr + bi * spb + t * spl, mask=tmask, other=0)
    for k in tl.static_range(K):
        back = K - 1 - k
        valid = tmask & (t >= back)
        if HAS_POS:
            valid = valid & (pos >= back)
        xv = tl.load(x_ptr + bi * sxb + (t - back)[:, None] * sxl + d[None, :] * sxd,
                     mask=valid[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + d * K + k, mask=dmask, other=0.0).to(tl.float32)
        acc += xv * wv[None, :]
    return acc


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, b_ptr, pos_ptr, y_ptr, L, D, sxb, sxl, sxd, spb, spl,
                K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, SILU: tl.constexpr,
                BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    bi, t, d, tmask, dmask = _tile(L, D, BLOCK_L, BLOCK_D)
    acc = _pre_activation(x_ptr, w_ptr, b_ptr, pos_ptr, bi, t, d, tmask, dmask, sxb, sxl, sxd, spb, spl,
                          K, HAS_BIAS, HAS_POS, BLOCK_L, BLOCK_D)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y_ptr + bi * L * D + t[:, None] * D + d[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=tmask[:, None] & dmask[None, :])


@triton.jit
def _grad_pre_kernel(dy_ptr, x_ptr, w_ptr, b_ptr, pos_ptr, g_ptr, L, D, sxb, sxl, sxd, syb, syl, syd, spb, spl,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, SILU: tl.constexpr,
                     BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """g = dL/d(pre-activation), fp32, (B, L, D) contiguous."""
    bi, t, d, tmask, dmask = _tile(L, D, BLOCK_L, BLOCK_D)
    mask = tmask[:, None] & dmask[None, :]
    g = tl.load(dy_ptr + bi * syb + t[:, None] * syl + d[None, :] * syd, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        acc = _pre_activation(x_ptr, w_ptr, b_ptr, pos_ptr, bi, t, d, tmask, dmask, sxb, sxl, sxd, spb, spl,
                              K, HAS_BIAS, HAS_POS, BLOCK_L, BLOCK_D)
        sig = tl.sigmoid(acc)
        g = g * sig * (1 + acc * (1 - sig))
    tl.store(g_ptr + bi * L * D + t[:, None] * D + d[None, :], g, mask=mask)


@triton.jit
def _grad_inputs_kernel(g_ptr, x_ptr, w_ptr, pos_ptr, dx_ptr, dw_ptr, db_ptr, L, D, sxb, sxl, sxd, spb, spl,
                        K: tl.constexpr, HAS_POS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """dx (B, L, D) contiguous; per tile, partial sums of dw (K, D) and db (D,) into row bi * n_tiles + lt."""
    bi, t, d, tmask, dmask = _tile(L, D, BLOCK_L, BLOCK_D)
    part = bi * tl.num_programs(1) + tl.program_id(1)
    g_rows = g_ptr + bi * L * D + d[None, :]
    g = tl.load(g_rows + t[:, None] * D, mask=tmask[:, None] & dmask[None, :], other=0.0)
    tl.store(db_ptr + part * D + d, tl.sum(g, axis=0), mask=dmask)
    if HAS_POS:
        pos = tl.load(pos_ptr + bi * spb + t * spl, mask=tmask, other=0)
    dx = tl.zeros((BLOCK_L, BLOCK_D), tl.float32)
    for k in tl.static_range(K):
        back = K - 1 - k
        wv = tl.load(w_ptr + d * K + k, mask=dmask, other=0.0).to(tl.float32)
        # dx[t] += w[k] * g[t + back], where output t + back read x[t] through tap k
        ahead = t + back
        reach = tmask & (ahead < L)
        if HAS_POS:
            reach = reach & (tl.load(pos_ptr + bi * spb + ahead * spl, mask=reach, other=0) >= back)
        g_ahead = tl.load(g_rows + ahead[:, None] * D, mask=reach[:, None] & dmask[None, :], other=0.0)
        dx += g_ahead * wv[None, :]
        # dw[k] += g[t] * x[t - back] over this tile's outputs t
        valid = tmask & (t >= back)
        if HAS_POS:
            valid = valid & (pos >= back)
        xv = tl.load(x_ptr + bi * sxb + (t - back)[:, None] * sxl + d[None, :] * sxd,
                     mask=valid[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        tl.store(dw_ptr + (part * K + k) * D + d, tl.sum(g * xv, axis=0), mask=dmask)
    tl.store(dx_ptr + bi * L * D + t[:, None] * D + d[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=tmask[:, None] & dmask[None, :])


def _grid(x: Tensor):
    return x.shape[0], triton.cdiv(x.shape[1], BLOCK_L), triton.cdiv(x.shape[2], BLOCK_D)


def _pos_args(pos: Tensor | None, x: Tensor):
    return (pos, pos.stride(0), pos.stride(1)) if pos is not None else (x, 0, 0)


@torch.library.custom_op("hybrids::conv1d_fwd", mutates_args=())
def conv1d_fwd(x: Tensor, weight: Tensor, bias: Tensor | None, pos: Tensor | None, silu: bool) -> Tensor:
    """x (B, L, D) any strides, weight (D, K), bias (D,), pos (B, L) positions in the document -> y (B, L, D)."""
    B, L, D = x.shape
    y = torch.empty((B, L, D), device=x.device, dtype=x.dtype)
    pos_ptr, spb, spl = _pos_args(pos, x)
    _fwd_kernel[_grid(x)](x, weight.contiguous(), bias if bias is not None else weight, pos_ptr, y, L, D,
                          *x.stride(), spb, spl, K=weight.shape[1], HAS_BIAS=bias is not None,
                          HAS_POS=pos is not None, SILU=silu, BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D)
    return y


@conv1d_fwd.register_fake
def _(x, weight, bias, pos, silu):
    return x.new_empty(x.shape)


@torch.library.custom_op("hybrids::conv1d_bwd", mutates_args=())
def conv1d_bwd(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, pos: Tensor | None,
               silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of x (B, L, D), weight (D, K) and bias (D,; zeros when there is none)."""
    B, L, D = x.shape
    K = weight.shape[1]
    w = weight.contiguous()
    pos_ptr, spb, spl = _pos_args(pos, x)
    grid = _grid(x)
    g = torch.empty((B, L, D), device=x.device, dtype=torch.float32)
    _grad_pre_kernel[grid](dy, x, w, bias if bias is not None else w, pos_ptr, g, L, D, *x.stride(), *dy.stride(),
                           spb, spl, K=K, HAS_BIAS=bias is not None, HAS_POS=pos is not None, SILU=silu,
                           BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D)
    dx = torch.empty((B, L, D), device=x.device, dtype=x.dtype)
    parts = B * grid[1]
    dw = torch.empty((parts, K, D), device=x.device, dtype=torch.float32)
    db = torch.empty((parts, D), device=x.device, dtype=torch.float32)
    _grad_inputs_kernel[grid](g, x, w, pos_ptr, dx, dw, db, L, D, *x.stride(), spb, spl, K=K,
                              HAS_POS=pos is not None, BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D)
    # contiguous, in the inputs' dtypes, as the fake below says (torch.compile checks the strides)
    return dx, dw.sum(0).t().contiguous().to(weight.dtype), db.sum(0).to((bias if bias is not None else weight).dtype)


@conv1d_bwd.register_fake
def _(dy, x, weight, bias, pos, silu):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), (bias if bias is not None else weight).new_empty(
        weight.shape[0])


def _setup(ctx, inputs, output):
    x, weight, bias, pos, silu = inputs
    ctx.save_for_backward(x, weight, bias, pos)
    ctx.silu = silu


def _backward(ctx, dy):
    x, weight, bias, pos = ctx.saved_tensors
    dx, dw, db = conv1d_bwd(dy, x, weight, bias, pos, ctx.silu)
    return dx, dw, db if bias is not None else None, None, None


conv1d_fwd.register_autograd(_backward, setup_context=_setup)


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None,
                  position: Tensor | None = None) -> Tensor:
    """As `conv.causal_conv1d_torch` on x (B, D, L) -> (B, D, L), computed in fp32, y in x's dtype (a transposed
    view of channels-last memory); position: (B, L) position of each token in its document, or None."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"conv activation must be 'silu', 'swish' or None, got {activation!r}")
    y = conv1d_fwd(x.transpose(1, 2), weight, bias, position, activation is not None)
    return y.transpose(1, 2)
