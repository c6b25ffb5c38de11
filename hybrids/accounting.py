"""Parameters, FLOPs per token and cache bytes of any layout, from a model built on the meta device.

Conventions (the blocks' `flops_per_token` and `cache_bytes` hooks follow them):
- A multiply-add is 2 FLOPs. Norms, activations, residual adds and the embedding lookup count 0; the LM head
  counts 2 * d_model * vocab per token. Mamba scans count their per-state multiply-adds; Gated DeltaNet its
  chunked products and triangular solve; a real FFT of n points 2.5 n log2 n (Hyena's long convolutions).
- Attention is causal: the query at position i (1-based) reads i keys, (seq_len + 1) / 2 on average.
- A shared block is counted at every invocation (FLOPs and one KV cache each). Its weights count once in
  `params_unique` and at every invocation in `params_per_invocation`; tied embeddings count once in both.
- Training FLOPs are 3 x forward (the backward pass costs twice the forward).
- Cache bytes are what `HybridLM.allocate_cache` allocates: keys, values and conv states in the model dtype,
  SSM states in fp32 at least. Hyena's cache counts as state although it grows with seq_len: the long
  convolutions' inputs (model dtype, per sequence) and their taps (fp32, once per block).
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from blocks import Block, ConfigError
from blocks.base import linear_flops
from hybrids.config import RECIPES, ModelConfig, load_config, recipe_names
from hybrids.model import HybridLM, build

DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
    "fp32": torch.float32, "float32": torch.float32,
    "fp64": torch.float64, "float64": torch.float64,
}
TRAINING_FACTOR = 3
# Dense bf16 peak FLOP/s by device name (the SXM parts' datasheets): the denominator of MFU, which is null for a
# device not listed here.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}
_RECIPE_NAME = re.compile(r"[a-z][a-z0-9._-]*")  # layouts start with a symbol, a count or "("


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from itself or a short name ("bf16", "fp32", ...)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def meta_model(source: str | ModelConfig | HybridLM, **overrides) -> HybridLM:
    """The model to account for: `source` itself if built, else built on the meta device (no memory).

    Raises:
        ConfigError: overrides given with a built model, or a name that is no recipe (listing the recipes).
    """
    if isinstance(source, HybridLM):
        if overrides:
            raise ConfigError("overrides need a recipe, a config or a layout, not a built model")
        return source
    _check_recipe(source)
    return build(source, device="meta", **overrides)


def _check_recipe(source) -> None:
    """A lower-case name cannot be a layout: say it is no recipe rather than point a caret at it."""
    if isinstance(source, str) and _RECIPE_NAME.fullmatch(source) and not source.endswith((".yaml", ".yml")) \
            and not Path(source).is_dir() \
            and not (RECIPES / f"{source}.yaml").is_file():
        raise ConfigError(f"unknown recipe {source!r}; recipes: {', '.join(recipe_names())} "
                          "(or give a YAML file or a layout such as \"6M:A*\")")


def _invocations(model: HybridLM):
    """(module, shared) for every entry of the model's plan, shared modules once per invocation."""
    for entry in model.plan:
        if entry[0] == "layer":
            yield model.layers[entry[1]], False
        else:
            yield model.shared[entry[1]], True


def _blocks(module) -> list[Block]:
    if isinstance(module, Block):
        return [module]
    return [b for b in (module.mixer, module.mlp) if b is not None]


def flops_breakdown(model: HybridLM, seq_len: int) -> dict[str, int]:
    """Forward FLOPs per token at seq_len by block name ("shared" for shared invocations, "lm_head")."""
    out: dict[str, int] = {}
    for module, shared in _invocations(model):
        for block in _blocks(module):
            key = "shared" if shared else block.name
            out[key] = out.get(key, 0) + block.flops_per_token(seq_len)
    out["lm_head"] = linear_flops(model.lm_head)
    return out


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def _shared_weights(module) -> list[torch.nn.Parameter]:
    """The weights every invocation of a shared module runs (per-invocation adapters excluded)."""
    if hasattr(module, "shared_parameters"):
        return module.shared_parameters()
    return list(module.parameters())


@dataclass
class Stats:
    """Accounting of one model at a sequence length, batch and cache dtype (see the module docstring)."""

    name: str | None
    layout: str  # canonical layout string
    n_layers: int  # backbone layers
    n_invocations: int  # shared-block invocations
    d_model: int
    vocab_size: int
    seq_len: int
    batch: int
    dtype: str
    params_unique: int  # every Parameter object once
    params_per_invocation: int  # shared weights counted at every invocation: what a forward pass runs
    params_embedding: int  # input embedding, plus the LM head when untied
    flops_forward: int  # per token at seq_len
    flops_training: int  # per token, 3 x forward
    flops_breakdown: dict[str, int]  # forward per token by block name, "shared" and "lm_head"
    kv_cache_bytes: int  # attention keys and values, one cache per attention layer and per invocation
    state_bytes: int  # recurrent states, conv + SSM
    describe: str = field(default="", repr=False)  # layout.describe(): one line per backbone layer

    @property
    def params_non_embedding(self) -> int:
        return self.params_unique - self.params_embedding

    @property
    def cache_bytes(self) -> int:
        return self.kv_cache_bytes + self.state_bytes

    def to_dict(self) -> dict:
        """The fields (describe excluded) plus the derived totals, JSON-ready."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "describe"}
        out.update(params_non_embedding=self.params_non_embedding, cache_bytes=self.cache_bytes)
        return out

    def table(self, layers: bool = False) -> str:
        """An aligned report; `layers` adds the per-layer resolution of the layout."""
        fwd = self.flops_forward
        sections = [
            (f"{self.name or 'model'}: {self.layout}", [
                ("backbone layers", self.n_layers, ""),
                ("shared invocations", self.n_invocations, ""),
                ("d_model", self.d_model, ""),
                ("vocab_size", self.vocab_size, ""),
            ]),
            ("parameters", [
                ("unique", self.params_unique, _human(self.params_unique)),
                ("per invocation", self.params_per_invocation, _human(self.params_per_invocation)),
                ("embedding", self.params_embedding, _human(self.params_embedding)),
                ("non-embedding", self.params_non_embedding, _human(self.params_non_embedding)),
            ]),
            (f"FLOPs per token at seq_len {self.seq_len:,}", [
                *((f"  {k}", v, f"{100 * v / fwd:.1f}%") for k, v in self.flops_breakdown.items()),
                ("forward", fwd, _human(fwd, "FLOP")),
                (f"training ({TRAINING_FACTOR} x forward)", self.flops_training, _human(self.flops_training, "FLOP")),
            ]),
            (f"cache bytes for {self.batch:,} x {self.seq_len:,} tokens ({self.dtype}, SSM state fp32)", [
                ("KV", self.kv_cache_bytes, _human_bytes(self.kv_cache_bytes)),
                ("recurrent state", self.state_bytes, _human_bytes(self.state_bytes)),
                ("total", self.cache_bytes, _human_bytes(self.cache_bytes)),
            ]),
        ]
        rows = [row for _, section in sections for row in section]
        label_w = max(len(r[0]) for r in rows)
        value_w = max(len(f"{r[1]:,}") for r in rows)
        lines = []
        for title, section in sections:
            lines.append(title)
            lines += [f"  {label:<{label_w}}  {value:>{value_w},}  {note}".rstrip() for label, value, note in section]
        if layers:
            lines += ["layers", *(f"  {line}" for line in self.describe.splitlines()[1:])]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _human(n: float, unit: str = "") -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "K" if unit else "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:g} {unit}".rstrip()


def _human_bytes(n: int) -> str:
    for scale, prefix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.2f} {prefix}"
    return f"{n} B"


def _cache_bytes(model: HybridLM, batch: int, seq_len: int, dtype: torch.dtype) -> tuple[int, int]:
    """(KV-cache bytes, recurrent-state bytes): one cache per attention layer and per shared invocation."""
    kv = state = 0
    for module, _ in _invocations(model):
        for block in _blocks(module):
            nbytes = block.cache_bytes(batch, seq_len, dtype)
            kv, state = kv + nbytes["kv"], state + nbytes["state"]
    return kv, state


def stats(source: str | ModelConfig | HybridLM, seq_len: int = 2048, batch: int = 1,
          dtype: str | torch.dtype = torch.bfloat16, **overrides) -> Stats:
    """Parameters, FLOPs per token and cache bytes of a model, without allocating its weights.

    Args:
        source: a HybridLM, a ModelConfig, a recipe name ("zamba-7b"), a YAML path or a layout ("6M:A*");
            all but a HybridLM are built on the meta device.
        seq_len: the sequence length of the FLOP count (attention's L-dependent term) and of the caches.
        batch: sequences held in the caches.
        dtype: the cache dtype (SSM states are kept in fp32 at least).
        overrides: ModelConfig fields or dotted keys, as for `hybrids.model.build`.
    Returns:
        The Stats.
    Raises:
        ConfigError, LayoutError, RegistryError: for a source or override that cannot be built.
    """
    if seq_len <= 0 or batch <= 0:
        raise ConfigError(f"seq_len and batch must be positive, got {seq_len} and {batch}")
    dtype = parse_dtype(dtype)
    model = meta_model(source, **overrides)
    kv, state = _cache_bytes(model, batch, seq_len, dtype)
    unique = _numel(model.parameters())
    uses = Counter(entry[1] for entry in model.plan if entry[0] != "layer")
    repeated = sum((n - 1) * _numel(_shared_weights(model.shared[key])) for key, n in uses.items())
    embedding = model.embed.weight.numel()
    if model.lm_head.weight is not model.embed.weight:
        embedding += model.lm_head.weight.numel()
    breakdown = flops_breakdown(model, seq_len)
    forward = sum(breakdown.values())
    config, layout = model.config, model.layout
    return Stats(
        name=config.name, layout=str(layout), n_layers=layout.n_layers, n_invocations=len(layout.invocations),
        d_model=config.d_model, vocab_size=config.vocab_size, seq_len=seq_len, batch=batch,
        dtype=str(dtype).removeprefix("torch."), params_unique=unique, params_per_invocation=unique + repeated,
        params_embedding=embedding, flops_forward=forward, flops_training=TRAINING_FACTOR * forward,
        flops_breakdown=breakdown, kv_cache_bytes=kv, state_bytes=state, describe=layout.describe(),
    )


def match_width(source: str | ModelConfig | HybridLM, target_params: int | None = None,
                target_flops: int | None = None, seq_len: int = 2048, multiple_of: int = 8,
                max_d_model: int = 1 << 16, target_cache_bytes: int | None = None, **overrides) -> int:
    """The d_model whose unique params (forward FLOPs per token, or cache bytes) at seq_len are closest to a target.

    Candidates are the multiples of `multiple_of` up to `max_d_model`; a width that a block refuses
    (ConfigError: heads, headdim and other divisibility constraints) is skipped. The count is assumed
    non-decreasing in d_model: a doubling search brackets the target, bisection narrows the bracket, and
    the closer end wins (the narrower on a tie).

    Args:
        source: a recipe, YAML path, layout, ModelConfig or HybridLM (its config); all other fields kept.
        target_params / target_flops / target_cache_bytes: exactly one of them; cache bytes are KV cache plus
            recurrent state for one sequence of seq_len tokens in bf16 (SSM states fp32), as `stats` counts them.
        seq_len: the sequence length of the FLOP and cache count.
        multiple_of: d_model is a multiple of this.
        max_d_model: the widest candidate.
        overrides: as for `stats` (d_model excluded: it is what is searched).
    Returns:
        The matched d_model.
    Raises:
        ConfigError: both or neither target, a config that fails at every width, or a target beyond max_d_model.
    """
    targets = {"params": target_params, "flops": target_flops, "cache_bytes": target_cache_bytes}
    given = [name for name, t in targets.items() if t is not None]
    if len(given) != 1:
        raise ConfigError("match_width needs exactly one of target_params, target_flops and target_cache_bytes")
    if "d_model" in overrides:
        raise ConfigError("match_width searches d_model: leave it out of the overrides")
    if multiple_of <= 0:
        raise ConfigError(f"multiple_of must be positive, got {multiple_of}")
    source = source.config if isinstance(source, HybridLM) else source
    _check_recipe(source)
    config = load_config(source, **overrides)
    by, target = given[0], targets[given[0]]
    values: dict[int, int | None] = {}
    errors: list[str] = []

    def value(k: int) -> int | None:  # the count at d_model = k * multiple_of, None if it cannot be built
        if k not in values:
            try:
                model = build(config, device="meta", d_model=k * multiple_of)
            except ConfigError as err:
                errors.append(str(err))
                values[k] = None
            else:
                values[k] = _budget(model, by, seq_len)
        return values[k]

    def valid_from(k: int, stop: int, step: int = 1) -> int | None:  # first buildable index from k towards stop
        for j in range(k, stop, step):
            if value(j) is not None:
                return j
        return None

    top = max_d_model // multiple_of
    lo = valid_from(1, top + 1)
    if lo is None:
        raise ConfigError(f"no d_model that is a multiple of {multiple_of} up to {max_d_model} builds: "
                          f"{errors[-1] if errors else 'none tried'}")
    if value(lo) >= target:
        return lo * multiple_of
    hi = None
    while hi is None:
        k = valid_from(min(2 * lo, top), top + 1) if lo < top else None
        if k is None:
            raise ConfigError(f"the target {target:,} is beyond d_model {max_d_model} "
                              f"({value(lo):,} at d_model {lo * multiple_of})")
        lo, hi = (k, None) if value(k) < target else (lo, k)
    while True:  # value(lo) < target <= value(hi)
        mid = (lo + hi) // 2
        if mid == lo:
            break
        k = valid_from(mid, hi)
        k = k if k is not None else valid_from(mid - 1, lo, -1)
        if k is None:
            break
        lo, hi = (k, hi) if value(k) < target else (lo, k)
    best = lo if target - value(lo) <= value(hi) - target else hi
    return best * multiple_of


def _budget(model: HybridLM, by: str, seq_len: int) -> int:
    """The quantity `match_width` matches: unique params, forward FLOPs per token or cache bytes at seq_len."""
    if by == "params":
        return _numel(model.parameters())
    if by == "flops":
        return sum(flops_breakdown(model, seq_len).values())
    return sum(_cache_bytes(model, 1, seq_len, torch.bfloat16))


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak FLOP/s from PEAK_BF16 (its name contains the key), None off CUDA or unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)
