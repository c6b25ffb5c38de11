"""CPU speed of the PyTorch Mamba1 / Mamba2 scans against their sequential references.

Times forward + backward at one shape per op, side by side in one run, and prints JSON with the
ratio reference / ours. The target (issue 2) is a ratio of at least 10 at length 1024.

    python benchmarks/scan_speed.py [--length 1024] [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from blocks.ops import selective_scan_ref, selective_scan_torch, ssd_chunked, ssd_ref

TARGET_RATIO = 10.0


def mamba1_case(length: int, batch=2, d_inner=256, d_state=16):
    """A tiny Mamba1 layer (d_model 128, expand 2) as trained on a laptop."""
    t = [torch.randn(batch, d_inner, length), torch.randn(batch, d_inner, length) * 0.5,
         -torch.exp(torch.randn(d_inner, d_state)), torch.randn(batch, 1, d_state, length),
         torch.randn(batch, 1, d_state, length), torch.randn(d_inner), torch.randn(batch, d_inner, length),
         torch.randn(d_inner)]
    shape = dict(batch=batch, d_inner=d_inner, d_state=d_state, length=length)
    return shape, [x.requires_grad_() for x in t], {
        "ours": lambda *a: selective_scan_torch(*a, delta_softplus=True),
        "sequential": lambda *a: selective_scan_ref(*a, delta_softplus=True),
    }


def mamba2_case(length: int, batch=2, heads=8, headdim=32, d_state=32, chunk=64):
    """A tiny Mamba2 layer (d_model 128, expand 2, headdim 32)."""
    t = [torch.randn(batch, length, heads, headdim), torch.randn(batch, length, heads), -torch.exp(torch.randn(heads)),
         torch.randn(batch, length, 1, d_state), torch.randn(batch, length, 1, d_state)]
    shape = dict(batch=batch, heads=heads, headdim=headdim, d_state=d_state, length=length, chunk=chunk)
    return shape, [x.requires_grad_() for x in t], {
        "ours": lambda *a: ssd_chunked(*a, chunk_size=chunk, dt_softplus=True),
        "sequential": lambda *a: ssd_ref(*a, dt_softplus=True),
    }


def time_fwd_bwd(fn, inputs, repeats: int) -> float:
    """Median seconds of one forward + backward, after one warm-up call."""
    times = []
    for i in range(repeats + 1):
        for x in inputs:
            x.grad = None
        start = time.perf_counter()
        fn(*inputs).sum().backward()
        if i:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one repeat of the sequential reference")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
               "target_ratio": TARGET_RATIO, "ops": {}}
    for name, case in (("mamba1_selective_scan", mamba1_case), ("mamba2_ssd", mamba2_case)):
        shape, inputs, fns = case(args.length)
        ours = time_fwd_bwd(fns["ours"], inputs, args.repeats)
        ref = time_fwd_bwd(fns["sequential"], inputs, 1 if args.quick else max(1, args.repeats // 2))
        results["ops"][name] = {"shape": shape, "ours_s": round(ours, 4), "sequential_s": round(ref, 4),
                                "ratio": round(ref / ours, 1), "target_met": ref / ours >= TARGET_RATIO}
    print(json.dumps(results, indent=2))
    return 0 if all(r["target_met"] for r in results["ops"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
