"""How far two mathematically identical training runs drift apart in bf16: the noise floor a DDP-vs-one-GPU loss
comparison is read against (issue 11).

    python benchmarks/order_sensitivity.py [--tiny] [--steps 30] [--batch 4] [--length 64]

Trains the same model from the same weights on the same batches several ways, with the training config's AdamW,
LR schedule and gradient clipping, in a plain loop: the whole batch (twice: run-to-run nondeterminism of the
kernels); the batch with its rows rolled by a quarter,
a half and three quarters (the same mean loss); the mean of the two halves' losses (what DDP over two ranks
computes); in bf16 autocast, and the whole batch and one rolled order in fp32. Prints JSON: per variant the
largest per-step loss difference from the whole-batch run of its precision, the step it occurs at and the first
step past 1e-3. In fp32 the reorderings agree to rounding; in
bf16 autocast each op's rounding depends on the order, and Adam turns near-zero gradients' rounding into full-size
updates, so the runs part at the peak learning rate. --tiny: zamba2-tiny on CPU; else the ~170M hybrid of
multi_gpu.py on CUDA.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from multi_gpu import HYBRID_170M, LM, TINY

from hybrids.training.config import compose
from hybrids.training.run import prepare


def train_losses(module, init, cfg, device, order: str, bf16: bool) -> list[float]:
    """Per-step training losses of one run from `init`: order "whole", "rotated-K" (rows rolled by K) or
    "halves"."""
    model = module.model
    model.load_state_dict(init)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                            weight_decay=cfg.optim.weight_decay)
    size = cfg.trainer.batch_size
    if order.startswith("rotated-"):
        k = int(order.split("-")[1])
        rows = [list(range(k, size)) + list(range(k))]
    else:
        rows = {"whole": [list(range(size))], "halves": [list(range(size // 2)), list(range(size // 2, size))]}[order]
    losses = []
    for step in range(cfg.trainer.max_steps):
        for group in opt.param_groups:
            group["lr"] = cfg.optim.lr * module.schedule.lr_factor(step)
        batch = module.task.batch(step, size, "train").to(device)
        parts = []
        for r in rows:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(batch.input_ids[r], doc_ids=None if batch.doc_ids is None else batch.doc_ids[r])
            parts.append(F.cross_entropy(logits.float().flatten(0, 1), batch.targets[r].flatten(), ignore_index=-100))
        loss = sum(parts) / len(parts)
        opt.zero_grad()
        loss.backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        losses.append(loss.item())
    return losses


def drift(base: list[float], other: list[float]) -> dict:
    diff = [b - a for a, b in zip(base, other, strict=True)]
    worst = max(range(len(diff)), key=lambda i: abs(diff[i]))
    return {"max_abs_loss_diff": abs(diff[worst]), "at_step": worst,
            "first_step_over_1e-3": next((i for i, d in enumerate(diff) if abs(d) > 1e-3), None)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="zamba2-tiny on CPU (default batch 4 x 64)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, help="global batch, even (default 16; --tiny 4)")
    p.add_argument("--length", type=int, help="sequence length (default 2048; --tiny 64)")
    args = p.parse_args(argv)
    batch, length = args.batch or (4 if args.tiny else 16), args.length or (64 if args.tiny else 2048)
    if batch % 2:
        print("order_sensitivity: --batch must be even (it is split in two halves)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.tiny else "cuda")
    cfg = compose([*(TINY if args.tiny else HYBRID_170M), *LM, f"task.seq_len={length}", f"trainer.batch_size={batch}",
                   f"trainer.max_steps={args.steps}", f"schedule.warmup_steps={args.steps // 5}",
                   "tracking.enabled=false"])
    module, _ = prepare(cfg)
    module.model.to(device)
    init = {k: v.clone() for k, v in module.model.state_dict().items()}
    out = {"device": device.type, "batch": batch, "length": length, "steps": args.steps}
    rotations = tuple(dict.fromkeys(f"rotated-{k}" for k in (batch // 4, batch // 2, 3 * batch // 4) if k))
    for precision, bf16, orders in (("fp32", False, ("whole", *rotations[:1])),
                                    ("bf16", True, ("whole", *rotations, "halves"))):
        base = train_losses(module, init, cfg, device, "whole", bf16)
        for order in orders:
            out[f"{precision}_{order}"] = drift(base, train_losses(module, init, cfg, device, order, bf16))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
