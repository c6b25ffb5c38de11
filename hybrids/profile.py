"""`hybrids profile`: measured cache bytes, latency and memory against context length, beside the accounting.

For each model, sequence length L and batch B: build the model (random weights, weights in `dtype`), allocate its
generation cache for L positions, prefill L - decode_tokens prompt tokens, then decode decode_tokens tokens one at
a time; then time one training step (forward, cross-entropy, backward) on B x L tokens. Measured bytes are the
allocated cache tensors (`HybridCache.nbytes`); predicted bytes are `hybrids.accounting.stats(model, seq_len=L,
batch=B, dtype)`; ratio = measured / predicted (1.0 when the accounting is exact). Latencies are wall-clock
medians over `repeats` runs after one warm-up (CUDA synchronised). On CUDA the peak allocated memory of prefill
and of the training step is measured too (weights included; empty on CPU, which has no per-call peak); a
training step that runs out of memory leaves its columns empty. `hybrids.profile_output` writes the CSV, the
figures and the MLflow run.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from blocks import ConfigError
from hybrids import accounting
from hybrids.model import HybridLM, build

COLUMNS = ("model", "layout", "d_model", "params", "device", "dtype", "seq_len", "batch", "kv_bytes",
           "state_bytes", "measured_bytes", "predicted_bytes", "ratio", "prefill_ms", "decode_ms_per_token",
           "decode_tokens_per_s", "train_ms", "train_tokens_per_s", "prefill_peak_gib", "train_peak_gib")


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


def _peak_gib(fn, device: torch.device) -> float | None:
    """Peak allocated GiB while fn() runs, on CUDA (None elsewhere)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def train_point(model: HybridLM, ids: torch.Tensor, repeats: int) -> dict:
    """ms, tokens/s and peak GiB of one training step (forward, cross-entropy, backward) on ids (B, L)."""
    device = ids.device
    model.train()

    def step(_=None):
        logits = model(ids)
        F.cross_entropy(logits.float().flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
        model.zero_grad(set_to_none=True)

    try:
        ms = _median_ms(step, repeats, device)
        peak = _peak_gib(step, device)
    except torch.OutOfMemoryError:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return {"train_ms": None, "train_tokens_per_s": None, "train_peak_gib": None}
    finally:
        model.eval()
    return {"train_ms": round(ms, 3), "train_tokens_per_s": round(1e3 * ids.numel() / ms, 1),
            "train_peak_gib": peak}


@torch.inference_mode()
def inference_point(model: HybridLM, name: str, seq_len: int, batch: int, decode_tokens: int, repeats: int) -> dict:
    """The cache and inference columns of `model` at sequence length `seq_len` (cache capacity) and batch `batch`."""
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
    prefill_peak = _peak_gib(lambda: model(prompt, fresh()), device)
    predicted = s.kv_cache_bytes + s.state_bytes
    total = measured["kv"] + measured["state"]
    return {"model": name, "layout": s.layout, "d_model": s.d_model, "params": s.params_unique,
            "device": device.type, "dtype": str(dtype).removeprefix("torch."), "seq_len": seq_len, "batch": batch,
            "kv_bytes": measured["kv"], "state_bytes": measured["state"], "measured_bytes": total,
            "predicted_bytes": predicted, "ratio": total / predicted if predicted else float("nan"),
            "prefill_ms": round(prefill_ms, 3), "decode_ms_per_token": round(decode_ms, 3),
            "decode_tokens_per_s": round(1e3 * batch / decode_ms, 1) if decode_ms > 0 else float("inf"),
            "prefill_peak_gib": prefill_peak}


def profile_point(model: HybridLM, name: str, seq_len: int, batch: int, decode_tokens: int, repeats: int) -> dict:
    """One row of `COLUMNS`: `inference_point`, then `train_point` on B x L random tokens."""
    row = inference_point(model, name, seq_len, batch, decode_tokens, repeats)
    generator = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(model.config.vocab_size, (batch, seq_len), generator=generator).to(model.embed.weight.device)
    row.update(train_point(model, ids, repeats))
    return {k: row[k] for k in COLUMNS}


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
