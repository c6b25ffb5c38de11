"""Where a training step's time goes under Lightning (issue 11): the step timed between two synchronizes, and on a GPU
the device's busy time in it (the union of its kernels and copies), its idle time, the host syncs a step (every
thread's, by the ops around them), and the host ops running while the device idles.

    python benchmarks/step_profile.py [--batch 8] [--length 2048] [--steps 40] [--graphs] [--set KEY=VALUE ...]
    python benchmarks/step_profile.py --tiny    # CPU, zamba2-tiny: timing only

The model is multi_gpu.py's ~170M hybrid (--tiny: zamba2-tiny), trained by `hybrids.training.run.train` in this
process as `hybrids train` would. Steps 10 to steps - 6 are timed without the profiler; the 5 steps after them are
profiled. A device that idles while the host works (launches, Python, syncs) is what makes a step at a
rank's half batch slower than half a step at the whole batch: the speed-up DDP can reach (multi_gpu.py --ceiling).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
from multi_gpu import HYBRID_170M, TINY, _run  # noqa: E402

from hybrids.training.run import train  # noqa: E402

PROFILED = 5
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


class StepClock(L.Callback):
    """Times steps [start, stop) between two synchronizes, then profiles the next PROFILED steps on CUDA."""

    def __init__(self, start: int, stop: int, trace: Path):
        self.start, self.stop, self.trace = start, stop, trace
        self.cuda = torch.cuda.is_available()
        self.result: dict = {}
        self._t0 = self._prof = None

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, *_):
        if self.cuda and trainer.global_step == self.stop:
            self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                            torch.profiler.ProfilerActivity.CUDA])
            self._sync()
            self._prof.__enter__()
            self._p0 = time.perf_counter()

    def on_train_batch_end(self, trainer, *_):
        step = trainer.global_step  # steps done
        if step == self.start:
            self._sync()
            self._t0 = time.perf_counter()
        elif step == self.stop:
            self._sync()
            self.result["ms_per_step"] = (time.perf_counter() - self._t0) / (self.stop - self.start) * 1e3
        elif self._prof is not None and step == self.stop + PROFILED:
            self._sync()
            wall = (time.perf_counter() - self._p0) / PROFILED * 1e3
            self._prof.__exit__(None, None, None)
            self._prof.export_chrome_trace(str(self.trace))
            self._prof = None
            self.result["profile"] = {"wall_ms_per_step": wall, **analyse(json.loads(self.trace.read_text()))}


def analyse(trace: dict) -> dict:
    """Device busy and idle time per step, host syncs per step, and the innermost host op (of the thread that runs
    the most ops) at the middle of each idle gap, summed per op name: ms per step."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    device = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                    key=lambda e: e["ts"])
    gaps, busy, end = [], 0.0, None
    for e in device:
        start, stop = e["ts"], e["ts"] + e["dur"]
        if end is not None and start > end:
            gaps.append((end, start))
        if end is None or start > end:
            busy += e["dur"]
        elif stop > end:
            busy += stop - end
        end = stop if end is None else max(end, stop)
    host = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation", "cuda_runtime")]
    main = collections.Counter(e["tid"] for e in host).most_common(1)[0][0] if host else None
    host = [e for e in host if e["tid"] == main]
    idle_by_op: collections.Counter = collections.Counter()
    for a, b in gaps:
        middle = (a + b) / 2
        around = [e for e in host if e["ts"] <= middle <= e["ts"] + e["dur"]]
        name = min(around, key=lambda e: e["dur"])["name"][:80] if around else "(no host op)"
        idle_by_op[name] += (b - a) / 1e3 / PROFILED
    sites = sync_sites(events)
    return {"device_busy_ms_per_step": busy / 1e3 / PROFILED,
            "device_idle_ms_per_step": sum(b - a for a, b in gaps) / 1e3 / PROFILED,
            "syncs_per_step": sum(sites.values()) / PROFILED,
            "syncs_per_step_by_site": {k: v / PROFILED for k, v in sites.most_common(10)},
            "idle_by_host_op_ms_per_step": {k: round(v, 3) for k, v in idle_by_op.most_common(10)}}


def sync_sites(events: list[dict]) -> collections.Counter:
    """Host syncs of every thread (the autograd engine's backward thread stalls the step as the main one does),
    counted by the ops around them on their thread: up to three innermost names, outermost first."""
    ops = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation")]
    sites: collections.Counter = collections.Counter()
    for sync in (e for e in events if e.get("cat") == "cuda_runtime" and e["name"] in SYNCS):
        around = sorted((e for e in ops if e["tid"] == sync["tid"] and e["ts"] <= sync["ts"] <= e["ts"] + e["dur"]),
                        key=lambda e: -e["dur"])
        sites[" > ".join(e["name"][:60] for e in around[-3:]) or "(no op)"] += 1
    return sites


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, help="sequences a step (default 8, a rank's half of multi_gpu.py's 16)")
    p.add_argument("--length", type=int, help="tokens per sequence (default 2048; --tiny 64)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--graphs", action="store_true", help="torch.compile with CUDA graphs (reduce-overhead)")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a training override")
    args = p.parse_args(argv)
    args.batch = args.batch or (2 if args.tiny else 8)
    args.length = args.length or (64 if args.tiny else 2048)
    stop = args.steps - PROFILED - 1
    if stop <= 10:
        raise SystemExit(f"--steps must be at least {12 + PROFILED} (10 warm-up steps, at least one timed step, "
                         f"{PROFILED} profiled ones and a last one)")
    graphs = ["trainer.compile=true", "trainer.compile_mode=reduce-overhead"] if args.graphs else []
    args.set = [*graphs, *args.set]
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    with tempfile.TemporaryDirectory() as tmp:
        clock = StepClock(10, stop, Path(tmp) / "trace.json")
        train([*_run(args, TINY if args.tiny else HYBRID_170M), "trainer.devices=1", "trainer.log_every=1000",
               f"run.dir={tmp}", "run.name=profile", "tracking.enabled=false", "trainer.progress_bar=false"],
              callbacks=[clock])
    ms = clock.result["ms_per_step"]
    print(json.dumps({"check": "step_profile", "batch": args.batch, "seq_len": args.length, "overrides": args.set,
                      "timed_steps": [10, stop], "ms_per_step": ms, "tokens_per_s": args.batch * args.length / ms * 1e3,
                      "profile": clock.result.get("profile")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
