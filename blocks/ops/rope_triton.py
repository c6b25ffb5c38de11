"""Rotary position embedding as one Triton kernel each way, for CUDA (`blocks.attention.apply_rope`).

The PyTorch path upcasts, negates, concatenates twice, multiplies twice and casts back: about eight kernels and
as many full-size copies per q and per k. Here each row is read once and written once, in fp32 inside the kernel:
channel j < R/2 pairs with j + R/2 (HF's rotate_half), channels past R pass through (partial rotary). The backward
is the same rotation by the opposite angle (a rotation's transpose), so it is the same kernel with sin negated.
Wrapped as torch.library custom ops; imported only on CUDA. TRITON_INTERPRET=1 runs it on CPU for tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_T = 16


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, H, T, sxb, sxh, sxt, sxd, scb, sct, sign,
                 DH: tl.constexpr, R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    bh, tt = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    t = tt * BLOCK_T + tl.arange(0, BLOCK_T)
    j = tl.arange(0, BLOCK_D)
    half: tl.constexpr = R // 2
    tmask, jmask = t < T, j < DH
    mask = tmask[:, None] & jmask[None, :]
    row = x_ptr + b * sxb + h * sxh + t[:, None] * sxt
    x = tl.load(row + j[None, :] * sxd, mask=mask, other=0.0).to(tl.float32)
    rotary = j < R
    partner = tl.where(j < half, j + half, j - half)
    xp = tl.load(row + partner[None, :] * sxd, mask=mask & rotary[None, :], other=0.0).to(tl.float32)
    angle = tl.where(j < half, j, j - half)
    table = b * scb + t[:, None] * sct + angle[None, :]
    c = tl.load(cos_ptr + table, mask=mask & rotary[None, :], other=1.0)
    s = tl.load(sin_ptr + table, mask=mask & rotary[None, :], other=0.0) * sign
    turn = tl.where(j < half, -1.0, 1.0)  # y1 = x1 c - x2 s; y2 = x2 c + x1 s
    y = tl.where(rotary[None, :], x * c + turn[None, :] * xp * s, x)
    tl.store(y_ptr + bh * T * DH + t[:, None] * DH + j[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, sign: float) -> Tensor:
    B, H, T, DH = x.shape
    R = cos.shape[-1]
    cos, sin = (t.reshape(-1, T, R).float().contiguous() for t in (cos, sin))  # (1 or B, T, R)
    y = torch.empty((B, H, T, DH), device=x.device, dtype=x.dtype)
    scb = T * R if cos.shape[0] > 1 else 0  # one table per row, or one for all
    _rope_kernel[(B * H, triton.cdiv(T, BLOCK_T))](x, cos, sin, y, H, T, *x.stride(), scb, R, sign,
                                                   DH=DH, R=R, BLOCK_T=BLOCK_T, BLOCK_D=triton.next_power_of_2(DH))
    return y


@torch.library.custom_op("hybrids::rope", mutates_args=())
def rope(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> Tensor:
    """x (B, H, T, Dh) rotated by cos / sin ((T, R) or (B, 1, T, R), R <= Dh even); inverse: by the opposite
    angle. A new contiguous tensor in x's dtype."""
    return _rotate(x, cos, sin, -1.0 if inverse else 1.0)


@rope.register_fake
def _(x, cos, sin, inverse):
    return x.new_empty(x.shape)


def _setup(ctx, inputs, output):
    _, cos, sin, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.inverse = inverse


def _backward(ctx, dy):
    cos, sin = ctx.saved_tensors
    return rope(dy, cos, sin, not ctx.inverse), None, None, None


rope.register_autograd(_backward, setup_context=_setup)
