"""Batch-1 greedy decoding speed and time to first token, ours against HF transformers', in one process (issue 10).

    python benchmarks/decode.py [--tiny] [--prompts 2048 8192 32768] [--new-tokens 64] [--rows NAME ...]

Rows: ours_zamba2 (from_hf of the 170M Zamba2) and ours_llama (the llama recipe) once per decoding in --decodings
(default cuda_graph and dynamic on CUDA, static and dynamic on CPU; see hybrids.decode), hf_zamba2 and hf_llama
(`generate(do_sample=False)`). Per prompt length: ttft_s, the seconds of a one-token generate (the prefill alone:
a CUDA graph is captured at the first step after it); tokens_per_s, the further new tokens per second of an n-token
generate: (n - 1) / (t_n - t_1), each t the fastest of --repeats runs (so it pays for the capture).
bf16 weights on CUDA, fp32 on CPU; random weights and prompts (nothing is downloaded).
Prints JSON; a row that raises records its error instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from reference_models import hf_model, our_model

FAMILIES = ("zamba2", "llama")


def _timed(generate, ids: torch.Tensor, n: int) -> float:
    """Seconds of generate(ids, n)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    generate(ids, n)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def generator(name: str, model, decoding: str | None):
    """fn(prompt, n) -> (1, T + n) greedy tokens, exactly n new ones."""
    if name.startswith("hf_"):
        return lambda ids, n: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                             pad_token_id=0)
    return lambda ids, n: model.generate(ids, n, decoding=decoding)


def measure(generate, prompts: list[int], new_tokens: int, vocab: int, device: torch.device, repeats: int) -> dict:
    """The fastest of `repeats` runs of each; tokens_per_s is null when timing noise exceeds the decoding time."""
    generate(torch.randint(0, vocab, (1, min(prompts)), device=device), 2)  # warm-up: autotuning, allocator
    out = {}
    for length in prompts:
        ids = torch.randint(0, vocab, (1, length), device=device)
        with torch.no_grad():
            first = min(_timed(generate, ids, 1) for _ in range(repeats))
            total = min(_timed(generate, ids, new_tokens) for _ in range(repeats))
        rate = (new_tokens - 1) / (total - first) if total > first else None
        out[str(length)] = {"ttft_s": round(first, 4), "tokens_per_s": round(rate, 1) if rate else None}
    return out


def rows(names: list[str], decodings: list[str]) -> list[tuple[str, str, str | None]]:
    """(row name, family, decoding) for each requested row."""
    out = []
    for name in names:
        family = name.split("_", 1)[1]
        if name.startswith("hf_"):
            out.append((name, family, None))
        else:
            out += [(f"{name}/{d}", family, d) for d in decodings]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU-sized models, prompts 32 and 128, 16 new tokens")
    p.add_argument("--prompts", type=int, nargs="+")
    p.add_argument("--new-tokens", type=int)
    all_rows = [f"{who}_{family}" for family in FAMILIES for who in ("ours", "hf")]
    p.add_argument("--rows", nargs="+", choices=all_rows, default=all_rows)
    p.add_argument("--decodings", nargs="+", choices=("dynamic", "static", "cuda_graph"))
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement; the fastest counts")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prompts = args.prompts or ([32, 128] if args.tiny else [2048, 8192, 32768])
    new_tokens = args.new_tokens or (16 if args.tiny else 64)
    decodings = args.decodings or (["cuda_graph", "dynamic"] if device.type == "cuda" else ["static", "dynamic"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    sources = {f: hf_model(f, args.tiny, max(prompts) + new_tokens) for f in FAMILIES}
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "dtype": str(dtype).removeprefix("torch."), "batch": 1, "new_tokens": new_tokens, "rows": {}}
    for name, family, decoding in rows(args.rows, decodings):
        try:
            source = sources[family] if name.startswith("hf_") else our_model(family, args.tiny, sources[family])
            model = source.to(device=device, dtype=dtype).eval()
            result = measure(generator(name, model, decoding), prompts, new_tokens, sources[family].config.vocab_size,
                             device, args.repeats)
        except Exception as err:  # one failing row (out of memory, a missing kernel) must not hide the others
            result = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
        out["rows"][name] = result
        print(name, result, file=sys.stderr, flush=True)
        model = source = None
        if name.startswith("hf_"):
            sources[family] = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
