"""`hybrids profile`: measured KV-cache + state bytes and prefill / decode latency against the accounting.

For each model, sequence length L and batch B: build the model (random weights, eval mode), allocate its
generation cache for L positions, prefill L - decode_tokens prompt tokens, then decode decode_tokens tokens one at
a time. Measured bytes are the allocated cache tensors (`HybridCache.nbytes`); predicted bytes are
`hybrids.accounting.stats(model, seq_len=L, batch=B, dtype)`; ratio = measured / predicted (1.0 when the
accounting is exact). Latencies are wall-clock medians over `repeats` runs after one warm-up (CUDA synchronised).

Writes <out>/profile.csv (one row per model, L, B; `COLUMNS`) and <out>/profile.png (cache bytes against L per
model, at the smallest batch: flat for recurrent state, growing for KV caches), and returns the rows.
"""

from __future__ import annotations

import csv
import statistics
import time
from pathlib import Path

import torch

from blocks import ConfigError
from hybrids import accounting
from hybrids.model import HybridLM, build

COLUMNS = ("model", "layout", "d_model", "params", "device", "dtype", "seq_len", "batch", "kv_bytes",
           "state_bytes", "measured_bytes", "predicted_bytes", "ratio", "prefill_ms", "decode_ms_per_token",
           "decode_tokens_per_s")


def widths_matched(sources: list[str], reference: str | None, overrides: dict) -> dict[str, int | None]:
    """d_model per source giving it the unique parameter count of `reference` (None: each keeps its own)."""
    if reference is None:
        return dict.fromkeys(sources)
    target = accounting.stats(reference, **overrides).params_unique
    free = {k: v for k, v in overrides.items() if k != "d_model"}  # the width is what matching sets
    return {s: accounting.match_width(s, target_params=target, multiple_of=2, **free) for s in sources}


def _median_ms(fn, repeats: int, device: torch.device, setup=lambda: None) -> float:
    """Median wall-clock ms of fn(setup()) over `repeats` runs; setup is not timed."""
    times = []
    for i in range(repeats + 1):  # the first run warms up (allocator, lazy init) and is not counted
        state = setup()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn(state)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


@torch.inference_mode()
def profile_point(model: HybridLM, name: str, seq_len: int, batch: int, decode_tokens: int, repeats: int) -> dict:
    """One row of `COLUMNS` for `model` at sequence length `seq_len` (cache capacity) and batch `batch`."""
    if seq_len <= decode_tokens:
        raise ConfigError(f"seq_len must exceed decode_tokens = {decode_tokens} (the prompt is seq_len - "
                          f"decode_tokens tokens), got {seq_len}")
    device, dtype = model.embed.weight.device, model.embed.weight.dtype
    generator = torch.Generator(device="cpu").manual_seed(0)
    prompt = torch.randint(model.config.vocab_size, (batch, seq_len - decode_tokens), generator=generator).to(device)
    token = prompt[:, -1:]
    cache = model.allocate_cache(batch, seq_len)
    measured = cache.nbytes()
    s = accounting.stats(model, seq_len=seq_len, batch=batch, dtype=dtype)

    def fresh():
        return model.allocate_cache(batch, seq_len)

    def filled():  # decoding starts after the whole prompt: its attention reads seq_len - decode_tokens positions
        c = fresh()
        model(prompt, c)
        return c

    def decode(c):
        for _ in range(decode_tokens):
            model(token, c, step=True)

    prefill_ms = _median_ms(lambda c: model(prompt, c), repeats, device, fresh)
    decode_ms = _median_ms(decode, repeats, device, filled) / decode_tokens
    predicted = s.kv_cache_bytes + s.state_bytes
    total = measured["kv"] + measured["state"]
    return {"model": name, "layout": s.layout, "d_model": s.d_model, "params": s.params_unique,
            "device": device.type, "dtype": str(dtype).removeprefix("torch."), "seq_len": seq_len, "batch": batch,
            "kv_bytes": measured["kv"], "state_bytes": measured["state"], "measured_bytes": total,
            "predicted_bytes": predicted, "ratio": total / predicted if predicted else float("nan"),
            "prefill_ms": round(prefill_ms, 3), "decode_ms_per_token": round(decode_ms, 3),
            "decode_tokens_per_s": round(1e3 * batch / decode_ms, 1) if decode_ms > 0 else float("inf")}


def profile(sources: list[str], seq_lens: list[int], batches: list[int], device: str = "cpu",
            dtype: str = "fp32", decode_tokens: int = 4, repeats: int = 3, match: str | None = None,
            overrides: dict | None = None) -> list[dict]:
    """Rows of `COLUMNS` for every source x seq_len x batch (see the module docstring).

    Args:
        sources: recipe names, YAML files or layouts ("zamba-tiny", "6M:A*").
        seq_lens, batches: the grid (positive integers). device: "cpu" or "cuda[:i]". dtype: fp32 | bf16 | fp16.
        decode_tokens: tokens decoded one at a time per measurement. repeats: timed runs (median).
        match: a source whose unique parameter count every model is widened to (None: each keeps its width).
        overrides: ModelConfig fields or dotted keys applied to every model, e.g. {"vocab_size": 256}.
    Raises:
        ConfigError: an empty or non-positive grid, an unknown device, a source that cannot be built.
    """
    overrides = dict(overrides or {})
    if not sources or not seq_lens or not batches:
        raise ConfigError("profile needs at least one model, one sequence length and one batch size")
    if min([*seq_lens, *batches]) < 1 or decode_tokens < 1 or repeats < 1:
        raise ConfigError("sequence lengths, batch sizes, decode_tokens and repeats must be positive integers")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available on this machine")
    torch_dtype = accounting.parse_dtype(dtype)
    widths = widths_matched(sources, None if match in (None, "none") else match, overrides)
    rows = []
    for source in sources:
        width = {} if widths[source] is None else {"d_model": widths[source]}
        model = build(source, device=device, **overrides, **width).to(torch_dtype).eval()
        rows += [profile_point(model, source, L, B, decode_tokens, repeats) for L in seq_lens for B in batches]
        del model
    return rows


def write_csv(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def bytes_figure(rows: list[dict], path: Path) -> Path:
    """Measured cache bytes (log) against sequence length (log), one line per model at the smallest batch,
    the accounting's prediction dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = min(r["batch"] for r in rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["model"] for r in rows):
        part = sorted((r for r in rows if r["model"] == name and r["batch"] == batch), key=lambda r: r["seq_len"])
        x = [r["seq_len"] for r in part]
        line, = ax.plot(x, [max(r["measured_bytes"], 1) for r in part], "-o", markersize=4,
                        label=f"{name} ({part[0]['layout']}, {part[0]['params']:,} params)")
        ax.plot(x, [max(r["predicted_bytes"], 1) for r in part], "--", color=line.get_color(), alpha=0.6)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel(f"KV cache + state bytes (batch {batch}); dashed: predicted")
    ax.set_title("Generation cache: flat for recurrent state, growing for KV caches", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
