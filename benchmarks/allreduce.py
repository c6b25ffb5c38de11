"""Gradient all-reduce between the GPUs of one host: the bandwidth DDP gets, and the transport NCCL chose (issue 11).

    python benchmarks/allreduce.py [--devices 2] [--numel 143000000] [--repeats 10]
    --tiny: gloo between CPU processes, 1M elements

One process per device all-reduces a buffer of `numel` elements (default: the ~170M hybrid's 143M unique parameters,
the gradient DDP reduces every step) in fp32 and in bf16, after 3 warm-up calls. Prints one JSON object: per dtype
the mean ms per all-reduce, the algorithm bandwidth (bytes / time) and the bus bandwidth (x 2(n-1)/n, comparable
with nccl-tests), and NCCL's channels as its INFO log names them (e.g. "via P2P/CUMEM" or "via SHM": peer-to-peer
over NVLink, or through host memory).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, backend: str, numel: int, repeats: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world, device_id=device if device.type == "cuda" else None)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        buffer = torch.ones(numel, dtype=dtype, device=device)
        for _ in range(3):
            dist.all_reduce(buffer)
        sync()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(repeats):
            dist.all_reduce(buffer)
        sync()
        seconds = (time.perf_counter() - start) / repeats
        summed = buffer.float().eq(float(world) ** (3 + repeats)).all().item()  # each call multiplies by world
        algbw = numel * buffer.element_size() / seconds / 1e9
        results[str(dtype).removeprefix("torch.")] = {
            "ms": round(seconds * 1e3, 3), "algbw_GBps": round(algbw, 2),
            "busbw_GBps": round(algbw * 2 * (world - 1) / world, 2), "bytes": numel * buffer.element_size(),
            "sums_right": summed}
    if rank == 0:
        queue.put(results)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--numel", type=int, help="elements per all-reduce (default 143M; --tiny 1M)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    backend = "gloo" if args.tiny else "nccl"
    if backend == "nccl" and torch.cuda.device_count() < args.devices:
        raise SystemExit(f"--devices {args.devices}: this machine has {torch.cuda.device_count()} GPUs")
    numel = args.numel or (1_000_000 if args.tiny else 143_000_000)
    with tempfile.TemporaryDirectory() as tmp:
        # NCCL's INFO log goes to files, so that stdout stays this script's JSON
        os.environ.update(NCCL_DEBUG="INFO", NCCL_DEBUG_FILE=f"{tmp}/nccl.%h.%p.log")
        queue = mp.get_context("spawn").SimpleQueue()
        mp.spawn(_worker, args=(args.devices, backend, numel, args.repeats, _free_port(), queue), nprocs=args.devices)
        results = queue.get()
        log = "".join(f.read_text() for f in Path(tmp).glob("nccl.*.log"))
    transports = sorted(set(re.findall(r" via (\S+)", log)))
    print(json.dumps({"check": "allreduce", "backend": backend, "devices": args.devices, "numel": numel,
                      "repeats": args.repeats, **results, "nccl_transports": transports}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
