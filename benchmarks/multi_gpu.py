"""Multi-GPU training checks (issue 11): DDP against one GPU at equal global batch, FSDP on a large recipe, and a
sweep that runs one trial per GPU.

    python benchmarks/multi_gpu.py ddp [--steps 50] [--devices 2]   # 1 GPU vs N GPUs, same global batch
        [--ceiling]   # and 1 GPU at one rank's batch: what N GPUs would give if they never communicated
    python benchmarks/multi_gpu.py fsdp [--steps 20] [--devices 2]  # zamba2-1.2b under FSDP
    python benchmarks/multi_gpu.py sweep [--devices 2]              # 2 x devices trials, one per GPU at a time
    --set KEY=VALUE (repeatable): a training override for ddp and fsdp runs, e.g. --set trainer.fused_ce=false
    --ddp-set KEY=VALUE (repeatable): an override for the ddp check's N-GPU run only, e.g. trainer.ddp_comm=bf16
    --tiny: ddp and sweep on CPU processes (gloo) at toy size

Each check runs `hybrids train` / `hybrids sweep` in a subprocess, as a user would, and prints one JSON object:
ddp: the per-step training loss of both runs (the mean over ranks), the largest per-step difference, and tokens/s
(median of the logged steps after the first 5) with their ratio; with --ceiling also one GPU's tokens/s at one
rank's batch (global / N), N times which is the speed-up that N ranks could reach with free communication, and the
share of it that DDP reached; fsdp: losses, tokens/s and peak GiB; sweep: each trial's GPU and start/end times,
and whether trials overlapped on different GPUs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The ~170M hybrid of issue 10 (hidden 1024, 12 Mamba2 layers, one shared block invoked twice, LoRA 64), as a recipe
HYBRID_170M = ["model=zamba2-1.2b", "model.d_model=1024", "model.layout='(5M2:A*:M2)x2'",
               "model.blocks.shared_attention.n_heads=16", "model.blocks.shared_attention.d_ff=4096",
               "model.blocks.shared_attention.lora_rank=64", "model.blocks.shared_attention.attn_lora_rank=64",
               "model.blocks.mamba2.d_state=64"]
TINY = ["model=zamba2-tiny"]
LM = ["task=lm", "task.max_bytes=2000000"]


def _train(overrides: list[str], run_dir: Path, name: str) -> tuple[list[dict], float]:
    """Run `hybrids train` and return its metrics.csv rows and the wall time."""
    cmd = [sys.executable, "-m", "hybrids.cli", "train", *overrides, f"run.dir={run_dir}", f"run.name={name}",
           "tracking.enabled=false", "trainer.progress_bar=false", "trainer.log_every=1"]
    start = time.perf_counter()
    # the run's own output goes to our stderr as it comes (stdout stays this script's JSON), so that a run stopped
    # by a time limit still leaves its progress behind
    done = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{name} failed (exit {done.returncode}); its output is above")
    (metrics,) = (run_dir / name / "csv").glob("version_*/metrics.csv")
    with open(metrics) as f:
        return list(csv.DictReader(f)), wall


def _series(rows: list[dict], key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


def _speed(rows: list[dict], skip: int = 5) -> float:
    speeds = [v for step, v in sorted(_series(rows, "perf/tokens_per_s").items()) if step >= skip]
    return statistics.median(speeds) if speeds else float("nan")


def _run(args, model: list[str]) -> list[str]:
    """The training overrides of a ddp or fsdp check: LM data, the global batch, one validation (at the last step)
    and no checkpoints on the way, then --set."""
    return [*model, *LM, f"task.seq_len={args.length}", f"trainer.batch_size={args.batch}",
            f"trainer.max_steps={args.steps}", f"schedule.warmup_steps={args.steps // 5}",
            f"trainer.val_every={args.steps}", "trainer.ckpt_every=1000000", "trainer.val_batches=1",
            "data.reset_at_boundaries=true", *(["trainer.accelerator=cpu"] if args.tiny else []), *args.set]


def ddp(args) -> dict:
    base = _run(args, TINY if args.tiny else HYBRID_170M)
    with tempfile.TemporaryDirectory() as tmp:
        one, wall1 = _train([*base, "trainer.devices=1"], Path(tmp), "one")
        many, wall2 = _train([*base, f"trainer.devices={args.devices}", "trainer.strategy=ddp", *args.ddp_set],
                             Path(tmp), "many")
    loss1, loss2 = _series(one, "train/loss"), _series(many, "train/loss")
    steps = sorted(set(loss1) & set(loss2))
    diffs = [abs(loss1[s] - loss2[s]) for s in steps]
    worst = max(range(len(steps)), key=diffs.__getitem__)
    speed1, speed2 = _speed(one), _speed(many)
    ceiling = {}
    if args.ceiling:
        rank_batch = args.batch // args.devices
        base[base.index(f"trainer.batch_size={args.batch}")] = f"trainer.batch_size={rank_batch}"
        with tempfile.TemporaryDirectory() as tmp:
            rank, _ = _train([*base, "trainer.devices=1"], Path(tmp), "rank")
        ideal = args.devices * _speed(rank) / speed1
        ceiling = {"rank_batch": rank_batch, "tokens_per_s_one_at_rank_batch": _speed(rank),
                   "speedup_without_communication": ideal, "share_of_it_reached": (speed2 / speed1) / ideal}
    return {"check": "ddp", "devices": args.devices, "overrides": args.set, "ddp_overrides": args.ddp_set,
            "global_batch": args.batch, "seq_len": args.length,
            "steps_compared": len(steps), "max_abs_loss_diff": diffs[worst], "at_step": steps[worst],
            "loss_at_worst": [loss1[steps[worst]], loss2[steps[worst]]],
            "final_loss": [loss1[steps[-1]], loss2[steps[-1]]], "tokens_per_s": [speed1, speed2],
            "speedup": speed2 / speed1, "wall_s": [wall1, wall2],
            **ceiling, "loss_one": [loss1[s] for s in steps], "loss_many": [loss2[s] for s in steps]}


def fsdp(args) -> dict:
    if args.tiny:
        raise SystemExit("fsdp runs on GPUs only (Lightning's FSDP has no CPU path)")
    model = ["model=zamba2-1.2b"]
    overrides = [*_run(args, model), f"trainer.devices={args.devices}", "trainer.strategy=fsdp"]
    with tempfile.TemporaryDirectory() as tmp:
        rows, wall = _train(overrides, Path(tmp), "fsdp")
    loss = _series(rows, "train/loss")
    memory = _series(rows, "perf/memory_gib")
    return {"check": "fsdp", "model": model[0], "devices": args.devices, "steps": len(loss),
            "first_loss": loss[min(loss)], "final_loss": loss[max(loss)], "tokens_per_s": _speed(rows, skip=3),
            "peak_gib_rank0": max(memory.values()) if memory else None, "wall_s": wall}


def sweep(args) -> dict:
    devices = ",".join(str(i) for i in range(args.devices))
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "hybrids.cli", "sweep", "study=attention-spacing", f"n_trials={2 * args.devices}",
               f"workers={args.devices}", *([] if args.tiny else [f"devices=[{devices}]"]),
               f"storage=journal:{tmp}/optuna.journal",
               "tracking_uri=none", f"train.run.dir={tmp}/runs", f"train.trainer.max_steps={args.steps}",
               *(["train.trainer.accelerator=cpu"] if args.tiny else [])]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode:
            raise SystemExit(f"sweep failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(f"{tmp}/optuna.journal"))
        (summary,) = optuna.get_all_study_summaries(storage)
        trials = optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()
    worker_gpu = {m.group(1): int(m.group(2)) for m in re.finditer(r"worker \d+ \(([^,)]+), GPU (\d+)\)", done.stdout)}
    gpu = {t.number: worker_gpu.get(t.user_attrs.get("worker")) for t in trials}
    done_trials = [t for t in trials if t.datetime_complete]
    spans = [(t.number, t.datetime_start.timestamp(), t.datetime_complete.timestamp()) for t in done_trials]
    overlaps = [(a, b) for a, sa, ea in spans for b, sb, eb in spans
                if a < b and sa < eb and sb < ea and gpu.get(a) is not None and gpu.get(a) != gpu.get(b)]
    return {"check": "sweep", "devices": args.devices, "trials": [
        {"number": n, "gpu": gpu.get(n), "state": t.state.name, "start": s, "end": e}
        for (n, s, e), t in zip(spans, done_trials, strict=True)],
        "complete": sum(t.state.name == "COMPLETE" for t in trials), "overlapping_pairs_on_different_gpus": overlaps,
        "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("check", choices=("ddp", "fsdp", "sweep"))
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int, help="global batch (default 16; --tiny 4)")
    p.add_argument("--length", type=int, help="tokens per sequence (default 2048; --tiny 64)")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--ceiling", action="store_true", help="ddp: also one GPU at one rank's batch")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a training override (ddp, fsdp)")
    p.add_argument("--ddp-set", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for the ddp check's N-GPU run only")
    args = p.parse_args()
    args.steps = args.steps or {"ddp": 50, "fsdp": 20, "sweep": 200}[args.check]
    args.batch = args.batch or (4 if args.tiny else 16)
    args.length = args.length or (64 if args.tiny else 2048)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    print(json.dumps({"ddp": ddp, "fsdp": fsdp, "sweep": sweep}[args.check](args)))


if __name__ == "__main__":
    main()
