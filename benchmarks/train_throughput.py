"""Training throughput of HF transformers' Zamba2 and Llama against ours, side by side in one process (issue 10).

    python benchmarks/train_throughput.py [--tiny] [--batch 4] [--length 2048] [--steps 10] [--rows NAME ...]
                                          [--profile NAME ... --profile-out DIR]

One row per model, each one training step (forward, cross-entropy, backward; no optimizer) on random tokens:
  hf_zamba2        transformers' Zamba2ForCausalLM at the 170M config (mamba-ssm kernels when importable)
  ours_auto        from_hf of that model, backend auto (kernels on CUDA), fused linear cross-entropy (--fused-ce)
  ours_auto_ce     the same with the plain cross-entropy on float logits
  ours_torch       backend torch (the PyTorch ops)
  ours_compile     ours_auto with torch.compile(model); first_step_s is the compile time
  ours_graphs      ours_auto with torch.compile(model, mode="reduce-overhead"): the step replayed as CUDA graphs
  hf_llama         transformers' LlamaForCausalLM 187M, SDPA
  ours_llama       the llama recipe at the same size, fused cross-entropy (--fused-ce)
  ours_llama_graphs  ours_llama with torch.compile(model, mode="reduce-overhead"), beside ours_graphs
Prints JSON: per row tokens/s (median step), first_step_s, peak GiB (torch.cuda.max_memory_allocated; null on CPU),
MFU (training FLOPs per token from hybrids.accounting, shared blocks counted per invocation, x tokens/s / the
device's peak bf16 FLOP/s; null where the peak is unknown, see hybrids.accounting.PEAK_BF16), or the error that row
raised. On CUDA the step runs in bf16 autocast over fp32 weights (as training's bf16-mixed); on CPU in fp32.
--tiny: CPU-sized models of the same structure (batch 2 x 64 tokens by default).
--profile: after timing the named rows, profile two more steps of each with torch.profiler and write the table of
kernels by self device time (and the launch count) to DIR/profile-NAME.txt.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from reference_models import hf_model, our_model, peak_flops, training_flops_per_token

from hybrids.training.loss import fused_linear_cross_entropy

ROWS = ("hf_zamba2", "ours_auto", "ours_auto_ce", "ours_torch", "ours_compile", "ours_graphs", "hf_llama",
        "ours_llama", "ours_llama_graphs")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _loss(kind: str, model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of one batch: "hf" (HF logits), "fused" or "plain" (ours)."""
    targets = ids.roll(-1, dims=1)
    if kind == "fused":
        return fused_linear_cross_entropy(model(ids, return_hidden=True), model.lm_head.weight, targets)[0]
    logits = model(input_ids=ids).logits if kind == "hf" else model(ids)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def measure(model, kind: str, ids: torch.Tensor, steps: int, device: torch.device) -> dict:
    """Seconds of the first step, median tokens/s of `steps` more, peak GiB over them."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps + 1):
        _sync(device)
        start = time.perf_counter()
        with autocast:
            loss = _loss(kind, model, ids)
        loss.backward()
        _sync(device)
        times.append(time.perf_counter() - start)
        for p in model.parameters():
            p.grad = None
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"tokens_per_s": round(ids.numel() / statistics.median(times[1:])), "first_step_s": round(times[0], 2),
            "peak_gib": round(peak, 2) if peak is not None else None}


def profile_steps(model, kind: str, ids: torch.Tensor, device: torch.device, path: str) -> None:
    """Two steps under torch.profiler: operators and kernels by self device time, written to `path`."""
    from torch.profiler import ProfilerActivity, profile

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            with autocast:
                loss = _loss(kind, model, ids)
            loss.backward()
            for p in model.parameters():
                p.grad = None
        _sync(device)
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    kernels = sum(e.count for e in events if e.device_type.name == "CUDA") // 2
    with open(path, "w") as f:
        f.write(f"kernel launches per step: {kernels}\n")
        f.write(events.table(sort_by=sort, row_limit=60, max_name_column_width=90))


def row_model(name: str, tiny: bool, zamba2_source, device: torch.device, fused_ce: str):
    """(model, loss kind, our model for the FLOP count) of a row."""
    fused = "fused" if fused_ce == "true" or (fused_ce == "auto" and device.type == "cuda") else "plain"
    if name == "hf_zamba2":
        return copy.deepcopy(zamba2_source).to(device), "hf", our_model("zamba2", tiny, zamba2_source)
    if name == "hf_llama":
        return hf_model("llama", tiny).to(device), "hf", our_model("llama", tiny)
    if name.startswith("ours_llama"):
        model = our_model("llama", tiny).to(device)
    else:
        model = our_model("zamba2", tiny, zamba2_source, backend="torch" if name == "ours_torch" else "auto").to(device)
    modes = {"ours_compile": "default", "ours_graphs": "reduce-overhead", "ours_llama_graphs": "reduce-overhead"}
    runner = torch.compile(model, mode=modes[name]) if name in modes else model  # runner.lm_head is model.lm_head
    return runner, "plain" if name == "ours_auto_ce" else fused, model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU-sized models (default batch 2 x 64)")
    p.add_argument("--batch", type=int)
    p.add_argument("--length", type=int)
    p.add_argument("--steps", type=int, default=10, help="timed steps after the first")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--peak-tflops", type=float, help="the device's peak bf16 TFLOP/s, for MFU")
    p.add_argument("--fused-ce", choices=("auto", "true", "false"), default="auto",
                   help="our rows' loss, as trainer.fused_ce (auto: fused on CUDA)")
    p.add_argument("--profile", nargs="+", choices=ROWS, default=[], help="rows to profile after timing them")
    p.add_argument("--profile-out", default=".", help="folder of the profile-NAME.txt tables")
    args = p.parse_args(argv)
    batch, length = args.batch or (2 if args.tiny else 4), args.length or (64 if args.tiny else 2048)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    zamba2_source = hf_model("zamba2", args.tiny)
    vocab = zamba2_source.config.vocab_size
    ids = torch.randint(0, vocab, (batch, length), device=device)
    peak = peak_flops(device, args.peak_tflops)
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "precision": "bf16-mixed" if device.type == "cuda" else "fp32", "batch": batch, "length": length,
           "steps": args.steps, "peak_flops": peak, "rows": {}}
    for name in args.rows:
        try:
            model, kind, counted = row_model(name, args.tiny, zamba2_source, device, args.fused_ce)
            result = measure(model, kind, ids, args.steps, device)
            flops = training_flops_per_token(counted, length)
            result["mfu"] = round(result["tokens_per_s"] * flops / peak, 4) if peak else None
            result["loss"] = kind
            if name in args.profile:
                profile_steps(model, kind, ids, device, f"{args.profile_out}/profile-{name}.txt")
        except Exception as err:  # one failing row (a missing kernel, out of memory) must not hide the others
            result = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
        out["rows"][name] = result
        print(name, result, file=sys.stderr, flush=True)
        model = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
