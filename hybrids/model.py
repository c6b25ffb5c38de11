"""HybridLM: embeddings, the layout's layers and shared-block invocations, final norm, LM head.

A backbone layer is `x + mixer(norm(x + s))` then `x + mlp(norm(x))`, where s is the output of the
shared-block invocations just before it when `inject="next"` (Zamba: added to the next layer's input,
before its pre-norm, not to the residual stream). With `inject="residual"` the shared output is added
to the residual stream instead. A shared output with no later layer is added before the final norm.

"A*" invokes Zamba's shared attention block (concatenated embeddings, per-invocation projection and
LoRA); any other starred symbol shares one residual layer of that block across its occurrences. A parallel
mixer "(A|M2)" is one `blocks.parallel.Parallel` block built from its branches' configured options.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from blocks import Block, Cache, registry
from blocks.norm import RMSNorm
from blocks.parallel import Parallel, ParallelConfig
from hybrids.config import ModelConfig, load_config
from hybrids.decode import make_decoder
from hybrids.layout import Layer as LayerSpec
from hybrids.layout import Layout, parse_layout
from hybrids.layout import Parallel as ParallelSpec

SHARED_FORM = {"attention": "shared_attention"}  # starred symbol -> the block built for it


class Layer(nn.Module):
    """One backbone layer: a pre-norm residual mixer and/or a pre-norm residual MLP."""

    def __init__(self, mixer: Block | None, mlp: Block | None, d_model: int, eps: float, backend: str = "auto"):
        super().__init__()
        self.mixer_norm = RMSNorm(d_model, eps, backend) if mixer is not None else None
        self.mixer = mixer
        self.mlp_norm = RMSNorm(d_model, eps, backend) if mlp is not None else None
        self.mlp = mlp

    def forward(self, x, inject=None, cache: Cache | None = None, step: bool = False, **context):
        """context (doc_ids in a forward, position in the fixed-shape step) goes to the blocks."""
        if self.mixer is not None:
            h = self.mixer_norm(x if inject is None else x + inject)
            x = x + (self.mixer.step(h, cache, **context) if step else self.mixer(h, cache, **context))
            inject = None
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x if inject is None else x + inject), **context)
        return x

    def allocate_cache(self, batch, max_seqlen, device=None, dtype=None):
        return self.mixer.allocate_cache(batch, max_seqlen, device, dtype) if self.mixer is not None else None


@dataclass
class HybridCache:
    """Generation state: one cache per layout item (recurrent state per Mamba layer, a KV cache per
    attention layer and per shared-block invocation) and the number of positions seen."""

    items: list[Cache | None]
    position: int = 0
    meta: dict = field(default_factory=dict)

    def nbytes(self) -> dict[str, int]:
        """Measured bytes: {"kv": attention caches, "state": recurrent states (conv + SSM)}."""
        out = {"kv": 0, "state": 0}
        for c in filter(None, self.items):
            for kind, n in c.nbytes_by_kind().items():
                out[kind] += n
        return out


class HybridLM(nn.Module):
    """A hybrid language model built from a ModelConfig (see the module docstring); `build` makes one."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.layout: Layout = parse_layout(config.layout, depth=config.depth)
        d = config.d_model
        self.embed = nn.Embedding(config.vocab_size, d)
        self.layers = nn.ModuleList()
        self.shared = nn.ModuleDict()
        # plan: ("layer", index in self.layers) | ("shared", key, invocation) | ("shared_layer", key)
        self.plan: list[tuple] = []
        uses: dict[str, int] = {}
        symbols: dict[str, str | ParallelSpec] = {}
        for item in self.layout.items:
            if isinstance(item, LayerSpec):
                self.plan.append(("layer", len(self.layers)))
                self.layers.append(self._layer(item.mixer, item.mlp))
                continue
            key = f"{item.symbol}_{item.slot}"
            self.plan.append(("shared", key, uses.get(key, 0)))
            uses[key] = uses.get(key, 0) + 1
            symbols[key] = item.symbol
        for key, n in uses.items():
            self.shared[key] = self._shared(symbols[key], n)
        self.plan = [("shared_layer", p[1]) if p[0] == "shared" and isinstance(self.shared[p[1]], Layer) else p
                     for p in self.plan]
        self.norm = RMSNorm(d, config.norm_eps, config.backend)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise for training from scratch: embedding and LM head N(0, init_std), then every block's
        own `init_weights` (Linears N(0, init_std), SSM parameters as Mamba initialises them).

        A tied LM head with a unit-variance embedding would put the input token's logit near d_model:
        a loss of 40-60 at the first step instead of about ln(vocab_size).
        """
        std = self.config.init_std
        nn.init.normal_(self.embed.weight, 0.0, std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, 0.0, std)
        for module in [*self.layers, *self.shared.values()]:
            for block in [module] if isinstance(module, Block) else [module.mixer, module.mlp]:
                if block is not None:
                    block.init_weights(std)

    def _block(self, name: str, **fixed) -> Block:
        entry = registry.get(name)
        options = {**self.config.block_options(entry.name), **fixed}
        if "backend" in entry.config_cls.__dataclass_fields__:
            options.setdefault("backend", self.config.backend)
        return entry.cls(entry.config_cls(d_model=self.config.d_model, **options))

    def _mixer(self, mixer: str | ParallelSpec) -> Block:
        if isinstance(mixer, ParallelSpec):
            config = ParallelConfig(d_model=self.config.d_model, **self.config.block_options("parallel"))
            return Parallel.build(config, mixer.branches, self._block)
        return self._block(mixer)

    def _layer(self, mixer: str | ParallelSpec | None, mlp: str | None) -> Layer:
        return Layer(self._mixer(mixer) if mixer else None, self._block(mlp) if mlp else None,
                     self.config.d_model, self.config.norm_eps, self.config.backend)

    def _shared(self, symbol: str | ParallelSpec, n_invocations: int) -> nn.Module:
        if isinstance(symbol, ParallelSpec):
            return self._layer(symbol, None)
        entry = registry.get(symbol)
        name = entry.name if entry.kind == "shared" else SHARED_FORM.get(entry.name)
        if name is not None:
            return self._block(name, n_invocations=n_invocations)
        if entry.kind == "mlp":
            return self._layer(None, symbol)
        return self._layer(symbol, None)

    def forward(self, input_ids: torch.Tensor, cache: HybridCache | None = None, step: bool = False,
                return_hidden: bool = False, position: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: (B, T) -> logits (B, T, vocab). With a cache: prefill (step=False) or one step.

        return_hidden: return the final hidden states (B, T, d_model) after the final norm instead of the logits
            (a fused linear cross-entropy applies the head itself: `hybrids.training.loss`).
        position: a 0-dim int64 tensor, the index of the one new token (step=True): the fixed-shape step of
            `hybrids.decode`, which writes at that index of the preallocated caches and leaves `cache.position`
            and the KV caches' lengths to the caller.
        doc_ids: (B, T) int document ids of packed rows (`blocks.ops.documents`), or None for one document per
            row. Every block gets them and every mixer resets at a document start, so each document's logits
            are those it gets alone. Generation (a cache's prefill and steps) serves one document per row:
            doc_ids with a cache is an error.
        """
        if doc_ids is not None and (cache is not None or doc_ids.shape != input_ids.shape):
            raise ValueError(f"doc_ids {tuple(doc_ids.shape)} must match input_ids {tuple(input_ids.shape)} and "
                             "come without a cache (generation runs one document per row)")
        context = {} if doc_ids is None else {"doc_ids": doc_ids}
        if position is not None:
            context["position"] = position
        x = self.embed(input_ids)
        emb, pending = x, None
        for i, entry in enumerate(self.plan):
            c = cache.items[i] if cache is not None else None
            if entry[0] == "shared":
                block = self.shared[entry[1]]
                out = (block.step if step else block)(x, c, emb=emb, invocation=entry[2], **context)
                if self.config.inject == "residual":
                    x = x + out
                else:
                    pending = out if pending is None else pending + out
                continue
            layer = self.layers[entry[1]] if entry[0] == "layer" else self.shared[entry[1]]
            x, pending = layer(x, pending, c, step, **context), None
        if pending is not None:
            x = x + pending
        if cache is not None and position is None:
            cache.position += input_ids.shape[1]
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x)

    def save_pretrained(self, directory, tokenizer: str | None = None):
        """Write config.json + model.safetensors to `directory` (see hybrids.save); returns the folder."""
        from hybrids.save import save_pretrained

        return save_pretrained(self, directory, tokenizer)

    @classmethod
    def from_pretrained(cls, directory, device=None, dtype: torch.dtype | None = None) -> HybridLM:
        """The model `save_pretrained` wrote to `directory`, in eval mode (see hybrids.save)."""
        from hybrids.save import from_pretrained

        return from_pretrained(directory, device, dtype)

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the blocks' auxiliary losses from the last forward (MoE load balancing), or None."""
        losses = [m.aux_loss() for m in self.modules() if isinstance(m, Block) and m.aux_loss() is not None]
        return torch.stack(losses).sum() if losses else None

    def allocate_cache(self, batch: int, max_seqlen: int, device=None, dtype=None) -> HybridCache:
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        items = []
        for entry in self.plan:
            module = self.layers[entry[1]] if entry[0] == "layer" else self.shared[entry[1]]
            items.append(module.allocate_cache(batch, max_seqlen, device, dtype))
        return HybridCache(items)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None, decoding: str = "auto") -> torch.Tensor:
        """Greedy (temperature 0) or sampled continuation with the hybrid cache.

        Args:
            input_ids: (B, T) prompt. max_new_tokens: tokens to add. temperature: 0 = greedy.
            top_k / top_p: restrict sampling to the k most likely / the nucleus of mass p.
            eos_token_id: stop once every sequence has produced it. generator: for reproducible sampling.
            decoding: "auto" (a CUDA graph of the fixed-shape step on CUDA where the layout allows it, else the
                dynamic step), "dynamic", "static" or "cuda_graph"; see `hybrids.decode`.
        Returns:
            (B, T + n) token ids, n <= max_new_tokens.
        """
        decoder = make_decoder(self, input_ids.shape[0], input_ids.shape[1] + max_new_tokens, decoding)
        logits = decoder.prefill(input_ids)
        out, done = [input_ids], torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for i in range(max_new_tokens):
            token = sample(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                token = torch.where(done, torch.full_like(token, eos_token_id), token)
                done |= token == eos_token_id
            out.append(token[:, None])
            if i == max_new_tokens - 1 or (eos_token_id is not None and bool(done.all())):
                break  # no step for logits nobody reads (a one-token generate is the prefill alone)
            logits = decoder.step(token)
        return torch.cat(out, dim=1)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V): argmax at temperature 0, else top-k / top-p sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix with mass >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def build(source: str | ModelConfig, device=None, **overrides) -> HybridLM:
    """Build a HybridLM from a recipe name, a YAML file, a layout string or a ModelConfig.

    Args:
        source: e.g. "zamba-7b", "6M:A*", or a ModelConfig.
        device: where to create the weights ("meta" builds without allocating memory); None: the
            caller's default device, so `with torch.device("meta"): build("zamba-7b")` allocates nothing.
        overrides: ModelConfig fields or dotted keys, e.g. d_model=512, depth=12,
            **{"blocks.shared_attention.lora_rank": 8}.
    Returns:
        The model.
    """
    config = load_config(source, **overrides)
    if device is None:
        return HybridLM(config)
    with torch.device(device):
        return HybridLM(config)
