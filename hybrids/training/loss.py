"""Fused linear cross-entropy: the LM head and the loss together, in chunks of tokens.

The plain path builds float logits of shape (N, V) (N = batch x length tokens) and keeps them for the backward:
3.2 GiB at 4 x 2048 tokens and a 32K vocabulary. Here each chunk of tokens gets its logits, its loss and at once
its gradients with respect to the hidden states and the head weight (the loss is the last op of the graph, so its
gradient is known up to the scalar that `backward` multiplies in); a chunk's logits are freed before the next
chunk's are made. Memory: the gradients (N x d and V x d) plus one chunk of logits.

Backends: "torch" (this file's autograd Function, any device) and "liger" (liger-kernel's Triton
LigerFusedLinearCrossEntropyLoss, CUDA, `pip install .[liger]`, imported on first use); "auto" takes liger on
CUDA when it imports, else torch.
"""

from __future__ import annotations

import math

import torch

from blocks import ConfigError
from blocks.base import state_dtype, upcast
from blocks.ops.backend import importable

BACKENDS = ("auto", "torch", "liger")


def resolve_backend(name: str, device: torch.device) -> str:
    """The backend that runs for tensors on `device`: "torch" or "liger".

    Raises:
        ConfigError: an unknown name, or "liger" where it cannot run.
    """
    if name not in BACKENDS:
        raise ConfigError(f"fused cross-entropy backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    liger = device.type == "cuda" and importable("liger_kernel")
    if name == "liger" and not liger:
        raise ConfigError("fused cross-entropy backend 'liger' needs CUDA tensors and liger-kernel "
                          "(pip install .[liger])")
    return "liger" if name == "liger" or (name == "auto" and liger) else "torch"


def default_chunk_size(n_tokens: int, d_model: int, vocab_size: int) -> int:
    """Tokens per chunk such that a chunk's logits hold about as many numbers as the hidden states do."""
    return max(1, math.ceil(n_tokens / math.ceil(vocab_size / d_model)))


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` over scored tokens, gradients computed in the forward.

    forward(hidden (N, d), weight (V, d), targets (N,) int64 with every ignored position already set to a valid
    class, scored (N,) bool, chunk_size int) -> (loss, an fp32 scalar (fp64 for fp64 inputs); correct (N,) bool,
    argmax == target & scored).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, scored, chunk_size):
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=state_dtype(hidden.dtype), device=hidden.device)
        n_scored = scored.sum().to(total.dtype)  # a tensor: no host sync
        correct = torch.zeros_like(scored)
        grad_hidden = torch.zeros_like(hidden) if needs_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=state_dtype(weight.dtype), device=weight.device) \
            if needs_grad else None
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            h, t, keep = hidden[start:end], targets[start:end, None], scored[start:end]
            logits = upcast(h @ weight.T)  # (n, V) in fp32 (fp64 stays): the only logits alive at a time
            lse = logits.logsumexp(-1)
            total += ((lse - logits.gather(1, t)[:, 0]) * keep).sum()
            correct[start:end] = (logits.argmax(-1) == t[:, 0]) & keep
            if needs_grad:
                # d loss / d logits = (softmax - onehot(target)) / n_scored on scored rows, 0 elsewhere
                grad = logits.sub_(lse[:, None]).exp_()
                grad.scatter_add_(1, t, torch.full_like(lse[:, None], -1.0))
                grad *= (keep / n_scored)[:, None]
                grad = grad.to(h.dtype)
                grad_hidden[start:end] = grad @ weight.to(h.dtype)
                grad_weight += grad.T @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(correct)
        return total / n_scored, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is None:
            return None, None, None, None, None
        grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


@torch.no_grad()
def argmax_correct(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """(N,) bool: argmax of hidden @ weight.T equals targets, computed chunk by chunk (N, d), (V, d), (N,)."""
    out = torch.empty(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        out[start : start + chunk_size] = (hidden[start : start + chunk_size] @ weight.T).argmax(-1) \
            == targets[start : start + chunk_size]
    return out


def _liger_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index)(weight, hidden, targets)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = -100, chunk_size: int | None = None,
                               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the LM head's logits without materialising them all.

    Equals `F.cross_entropy((hidden @ weight.T).float().flatten(0, -2), targets.flatten(), ignore_index=...)`,
    loss and gradients (hidden and weight; a tied head gets both its uses' gradients from autograd).

    Args:
        hidden: (..., d) final hidden states (after the final norm; `HybridLM(..., return_hidden=True)`).
        weight: (V, d) LM-head weight.
        targets: (...) int64 class ids, `ignore_index` where nothing is scored.
        ignore_index: the unscored target value.
        chunk_size: tokens per chunk (torch backend); None: `default_chunk_size`.
        backend: "auto" | "torch" | "liger" (see the module docstring).
    Returns:
        (loss, correct): the mean over scored tokens, an fp32 (or fp64) scalar (NaN when nothing is scored, as
        F.cross_entropy gives); (...) bool, argmax == target at scored positions (for accuracy metrics).
    Raises:
        ConfigError: an unknown backend, or liger where it cannot run.
    """
    if torch.is_autocast_enabled(hidden.device.type):
        # the head's matmuls in the autocast dtype, as F.linear runs under autocast: fp32 master weights would
        # otherwise pull every chunk's matmul up to fp32
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    d = hidden.shape[-1]
    flat, flat_targets = hidden.reshape(-1, d), targets.reshape(-1)
    scored = flat_targets != ignore_index
    safe = torch.where(scored, flat_targets, torch.zeros_like(flat_targets))
    chunk = chunk_size or default_chunk_size(flat.shape[0], d, weight.shape[0])
    if resolve_backend(backend, hidden.device) == "liger":
        # the argmax chunks first: they queue behind the model's forward while Liger's loss begins with a host sync
        # (its count of scored tokens), after which its own chunk loop would leave the GPU waiting on their launches
        correct = argmax_correct(flat.detach(), weight.detach(), safe, chunk) & scored
        loss = _liger_loss(flat, weight, flat_targets, ignore_index)
    else:
        loss, correct = ChunkedLinearCrossEntropy.apply(flat, weight, safe, scored, chunk)
    return loss, correct.view(targets.shape)
