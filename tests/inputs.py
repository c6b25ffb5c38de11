"""Random inputs for the op tests, in the shapes the ops take."""

import torch


def leaf(*tensors):
    return [t.detach().requires_grad_() for t in tensors]


def selective_scan_inputs(b=2, d=8, n=4, length=37, groups=1, dtype=torch.float64, decay=1.0, device="cpu"):
    """u, delta, A, B, C, D, z, delta_bias for `selective_scan_*` (delta before softplus)."""
    kw = dict(dtype=dtype, device=device)
    return leaf(
        torch.randn(b, d, length, **kw), torch.randn(b, d, length, **kw) * 0.5,
        -torch.exp(torch.randn(d, n, **kw)) * decay, torch.randn(b, groups, n, length, **kw),
        torch.randn(b, groups, n, length, **kw), torch.randn(d, **kw), torch.randn(b, d, length, **kw),
        torch.randn(d, **kw) * 0.5,
    )


def ssd_inputs(b=2, length=45, heads=4, headdim=3, groups=2, n=5, dtype=torch.float64, decay=1.0, device="cpu"):
    """x, dt, A, B, C, D, z, dt_bias for `ssd_*` (dt before softplus)."""
    kw = dict(dtype=dtype, device=device)
    return leaf(
        torch.randn(b, length, heads, headdim, **kw), torch.randn(b, length, heads, **kw),
        -torch.exp(torch.randn(heads, **kw)) * decay, torch.randn(b, length, groups, n, **kw),
        torch.randn(b, length, groups, n, **kw), torch.randn(heads, **kw), torch.randn(b, length, heads, headdim, **kw),
        torch.randn(heads, **kw) * 0.5,
    )


def grads(out, inputs, seed=1):
    """Gradients of a fixed random projection of `out` (a tensor or a tuple) w.r.t. inputs."""
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen, dtype=torch.float32).to(o.device)).sum() for o in outs)
    return torch.autograd.grad(loss, [t for t in inputs if t.requires_grad], allow_unused=True)


def max_rel(a, b):
    """max |a - b| / max |b| (0 when both are zero)."""
    scale = b.abs().max().clamp_min(1e-30)
    return ((a.double() - b.double()).abs().max() / scale.double()).item()


def noisy(model):
    """The model with noise on every parameter (so that parity is not a coincidence of its init), in eval mode."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()
