"""GPU fwd+bwd time and peak memory of the Mamba / Mamba2 blocks: PyTorch path vs mamba-ssm kernels.

    python benchmarks/gpu_blocks.py [--batch 8] [--length 2048] [--d-model 1024]

Prints JSON; times are CUDA-event medians after warm-up, bf16. Without mamba-ssm only the PyTorch path
is timed (the JSON says why the kernels are missing). On a machine without CUDA it prints one line,
"gpu_blocks: needs CUDA ...", and exits with status 2: there is nothing to measure, and a zero status
with an empty result would let a script that collects benchmark numbers record a CPU box as a GPU result.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from blocks.attention import Attention, AttentionConfig
from blocks.mamba import Mamba, MambaConfig
from blocks.mamba2 import Mamba2, Mamba2Config
from blocks.ops.backend import import_error


def time_block(block, x, repeats=10) -> tuple[float, float]:
    """Median ms of forward+backward and peak GiB."""
    for _ in range(3):
        block(x).float().square().mean().backward()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        block(x).float().square().mean().backward()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2], torch.cuda.max_memory_allocated() / 2**30


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--d-model", type=int, default=1024)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"gpu_blocks: needs CUDA (torch {torch.__version__} sees no CUDA device)", file=sys.stderr)
        return 2
    d = args.d_model
    makers = {
        "mamba": lambda b: Mamba(MambaConfig(d_model=d, backend=b)),
        "mamba2": lambda b: Mamba2(Mamba2Config(d_model=d, headdim=64, d_state=64, backend=b)),
    }
    kernels = import_error("mamba_ssm")
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16",
           "shape": vars(args), "kernels": kernels or "mamba_ssm", "blocks": {}}
    x = torch.randn(args.batch, args.length, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for name, make in makers.items():
        for backend in ("mamba_ssm", "torch") if kernels is None else ("torch",):
            torch.cuda.empty_cache()
            ms, gib = time_block(make(backend).cuda().bfloat16(), x)
            out["blocks"][f"{name}/{backend}"] = {"ms": round(ms, 2), "peak_gib": round(gib, 2),
                                                  "tokens_per_s": round(args.batch * args.length / ms * 1e3)}
            print(name, backend, out["blocks"][f"{name}/{backend}"], file=sys.stderr, flush=True)
    attn = Attention(AttentionConfig(d_model=d, n_heads=d // 64)).cuda().bfloat16()
    ms, gib = time_block(attn, x)
    out["blocks"]["attention/sdpa"] = {"ms": round(ms, 2), "peak_gib": round(gib, 2)}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
