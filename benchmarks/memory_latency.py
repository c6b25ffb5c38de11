"""The Zamba paper's check 2: KV-cache + state bytes and prefill / decode latency of Zamba-style hybrids against a
transformer and a pure Mamba at matched parameters, measured and set against the accounting's prediction.

    python benchmarks/memory_latency.py            # CPU: lengths 128..1024, batch 1 and 4, fp32, tiny widths
    python benchmarks/memory_latency.py --gpu      # CUDA: lengths 1K..32K, batch 1, 4, 16, bf16, d_model 1024

Every model is widened to zamba-tiny's parameter count (at d_model 1024 on GPU). Writes profile.csv and
profile.png to --out (default runs/memory-latency[-gpu]) and prints the JSON of `hybrids profile`.
"""

from __future__ import annotations

import argparse
import sys

from hybrids.cli import main

MODELS = ["llama-tiny", "mamba-tiny", "mamba2-tiny", "zamba-tiny", "zamba2-tiny"]
CPU = ["--seq-lens", "128", "256", "512", "1024", "--batches", "1", "4", "--dtype", "fp32"]
GPU = ["--seq-lens", "1024", "2048", "4096", "8192", "16384", "32768", "--batches", "1", "4", "16", "--dtype", "bf16",
       "--device", "cuda", "--set", "d_model=1024"]


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="the GPU-scale grid (needs CUDA)")
    parser.add_argument("--out", default=None, help="output folder")
    args, rest = parser.parse_known_args(argv)
    out = args.out or ("runs/memory-latency-gpu" if args.gpu else "runs/memory-latency")
    return main(["profile", *MODELS, *(GPU if args.gpu else CPU), "--match", "zamba-tiny", "--out", out, *rest])


if __name__ == "__main__":
    sys.exit(run())
