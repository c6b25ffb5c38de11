"""Parallel linear recurrence h_t = a_t * h_{t-1} + b_t, the core of the Mamba1 selective scan.

A work-efficient (Blelloch) scan: log2(L) levels up and down over strided views, O(L) element work,
in place on one fp32 buffer. Decays multiply (never divide), so strong decay stays finite and exact to
rounding. The backward pass is the same scan run in reverse time, so autograd keeps only a and h.
"""

from __future__ import annotations

import torch


def _scan_inplace(a: torch.Tensor, x: torch.Tensor) -> None:
    """Inclusive scan along dim 1 of (B, P, F) buffers, P a power of two; x becomes h, a is clobbered."""
    levels = []
    a_lvl, x_lvl = a, x
    while x_lvl.shape[1] > 1:
        a2 = a_lvl.unflatten(1, (-1, 2))  # (B, P/2^k/2, 2, F), strided view
        x2 = x_lvl.unflatten(1, (-1, 2))
        x2[:, :, 1].addcmul_(a2[:, :, 1], x2[:, :, 0])
        a2[:, :, 1].mul_(a2[:, :, 0])
        levels.append((a2, x2))
        a_lvl, x_lvl = a2[:, :, 1], x2[:, :, 1]
    # Down-sweep: odd elements of each level are final once the level above is; fix the even ones.
    for a2, x2 in reversed(levels):
        x2[:, 1:, 0].addcmul_(a2[:, 1:, 0], x2[:, :-1, 1])


def _scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, reverse: bool = False) -> torch.Tensor:
    """h for (B, L, F) fp32 inputs without touching them; `reverse` scans from the end (a_t multiplies h_{t+1})."""
    batch, length, feat = b.shape
    padded = 1 << max(length - 1, 0).bit_length()
    a_buf = a.new_ones(batch, padded, feat)
    x_buf = b.new_zeros(batch, padded, feat)
    a_buf[:, :length] = a.flip(1) if reverse else a
    x_buf[:, :length] = b.flip(1) if reverse else b
    if h0 is not None:
        x_buf[:, 0].addcmul_(a_buf[:, 0], h0)
    _scan_inplace(a_buf, x_buf)
    h = x_buf[:, :length]
    return h.flip(1) if reverse else h


class _LinearScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, h0):
        h = _scan(a, b, h0)
        ctx.save_for_backward(a, h, h0)
        return h

    @staticmethod
    def backward(ctx, grad_h):
        a, h, h0 = ctx.saved_tensors
        # dL/dh_t accumulates through h_{t+1} = a_{t+1} h_t + b_{t+1}: a reverse scan with decays a_{t+1}.
        a_next = torch.cat([a[:, 1:], a.new_zeros(a.shape[0], 1, a.shape[2])], dim=1)
        grad_b = _scan(a_next, grad_h.contiguous(), None, reverse=True)
        h_prev = torch.cat([h0[:, None] if h0 is not None else torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
        grad_a = grad_b * h_prev
        grad_h0 = grad_b[:, 0] * a[:, 0] if h0 is not None else None
        return grad_a, grad_b, grad_h0


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """Solve h_t = a_t * h_{t-1} + b_t along dim 1, in parallel, in fp32.

    Args:
        a: (B, L, ...) decays.
        b: (B, L, ...) inputs, same shape as a.
        h0: optional (B, ...) state before the first step (zero if None).
    Returns:
        h: (B, L, ...) in float32 (float64 for float64 inputs).
    """
    shape = b.shape
    dtype = torch.promote_types(b.dtype, torch.float32)
    a_ = a.to(dtype).reshape(shape[0], shape[1], -1)
    b_ = b.to(dtype).reshape(shape[0], shape[1], -1)
    h0_ = h0.to(dtype).reshape(shape[0], -1) if h0 is not None else None
    return _LinearScan.apply(a_, b_, h0_).reshape(shape)


def linear_scan_ref(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """Sequential reference of `linear_scan` (a Python loop over time; tests and benchmarks only)."""
    dtype = torch.promote_types(b.dtype, torch.float32)
    h = h0.to(dtype) if h0 is not None else torch.zeros_like(b[:, 0], dtype=dtype)
    out = []
    for t in range(b.shape[1]):
        h = a[:, t].to(dtype) * h + b[:, t].to(dtype)
        out.append(h)
    return torch.stack(out, dim=1)
