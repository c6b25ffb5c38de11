"""Decoders for `HybridLM.generate`: a prefill, then one step per token.

Batch-1 decoding of a 170M hybrid spends about 60 ms per token in Python launching a few hundred small kernels
(issue 10); the GPU waits. The fixed-shape step fixes that at the root: every tensor keeps its shape from token to
token (the KV caches are read whole, the unfilled slots masked by position; the new token's index is a device
tensor, not a Python count), so the whole step can be captured once as a CUDA graph and replayed per token.

Decodings:
- "dynamic": the step of the blocks' protocol; the attention caches grow by a Python count (any layout).
- "static": the fixed-shape step, run eagerly (any device; layouts whose blocks all have `static_step`).
- "cuda_graph": the fixed-shape step captured once as a CUDA graph (CUDA only).
- "auto": cuda_graph on CUDA when the layout allows it, else dynamic.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from blocks import Block, ConfigError
from blocks.base import KVCache

if TYPE_CHECKING:
    from hybrids.model import HybridLM

DECODINGS = ("auto", "dynamic", "static", "cuda_graph")


class DynamicDecoder:
    """The blocks' own step: shapes follow the position, the caches count positions in Python."""

    def __init__(self, model: HybridLM, batch: int, max_seqlen: int):
        self.model, self.cache = model, model.allocate_cache(batch, max_seqlen)

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: (B, T) -> the last position's logits (B, V); fills the cache."""
        return self.model(input_ids, self.cache)[:, -1]

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """token: (B,) -> logits (B, V) of the next position."""
        return self.model(token[:, None], self.cache, step=True)[:, -1]


class StaticDecoder:
    """The fixed-shape step over the preallocated cache, eager or replayed as a CUDA graph.

    Its input (the token), its position (a 0-dim int64 tensor that the step itself advances) and its output
    (the logits) live in buffers that never move, which is what a CUDA graph needs. With `cuda_graph` the step is
    captured at the first step after prefill, so the first token (the prefill's) never waits for it: two warm-up
    steps at the current position let Triton and cuBLAS settle, the capture records a third (capturing runs
    nothing), and the recurrent states and position are then put back as prefill left them (KV caches need not be:
    a step writes its own position before it reads it, so the slot the warm-up wrote is written again before
    anything reads it).
    """

    def __init__(self, model: HybridLM, batch: int, max_seqlen: int, cuda_graph: bool = False):
        device = model.embed.weight.device
        self.model, self.cache = model, model.allocate_cache(batch, max_seqlen)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.cuda_graph = cuda_graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def _step(self) -> torch.Tensor:
        logits = self.model(self.token, self.cache, step=True, position=self.position)[:, -1]
        self.position += 1
        return logits

    def _capture(self) -> None:
        saved = [t.clone() for t in state_tensors(self.cache)] + [self.position.clone()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # each at the current position: a cache sized for the prompt + n tokens has no more
                self._step()
                self.position.copy_(saved[-1])
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()
        for t, s in zip([*state_tensors(self.cache), self.position], saved, strict=True):
            t.copy_(s)

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: (B, T) -> the last position's logits (B, V); fills the cache (the ordinary forward)."""
        logits = self.model(input_ids, self.cache)[:, -1]
        self.position.fill_(input_ids.shape[1])
        return logits

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """token: (B,) -> logits (B, V) of the next position; with a graph, a view of the output buffer that the
        next step overwrites."""
        self.token.copy_(token[:, None])
        if self.cuda_graph and self.graph is None:
            self._capture()
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.logits


def state_tensors(cache) -> list[torch.Tensor]:
    """The tensors of a (nested) cache that a step overwrites whatever its position: all but the KV caches'."""
    if isinstance(cache, torch.Tensor):
        return [cache]
    if isinstance(cache, (list, tuple)):
        return [t for item in cache for t in state_tensors(item)]
    if dataclasses.is_dataclass(cache) and not isinstance(cache, KVCache):
        return [t for f in dataclasses.fields(cache) for t in state_tensors(getattr(cache, f.name))]
    return []


def not_static(model: HybridLM) -> list[str]:
    """The names of the model's blocks without a fixed-shape step (empty: static decoding works)."""
    return sorted({m.name for m in model.modules() if isinstance(m, Block) and not m.static_step})


def make_decoder(model: HybridLM, batch: int, max_seqlen: int, decoding: str = "auto"):
    """A decoder for `batch` sequences of at most `max_seqlen` positions.

    Args:
        decoding: "auto" | "dynamic" | "static" | "cuda_graph" (see the module docstring).
    Returns:
        A DynamicDecoder or StaticDecoder (prefill(input_ids), step(token) -> logits).
    Raises:
        ConfigError: an unknown decoding, a fixed-shape one for a layout whose blocks lack it, or cuda_graph off CUDA.
    """
    if decoding not in DECODINGS:
        raise ConfigError(f"decoding must be one of {', '.join(DECODINGS)}, got {decoding!r}")
    blockers = not_static(model)
    on_cuda = model.embed.weight.device.type == "cuda"
    if decoding == "auto":
        decoding = "cuda_graph" if on_cuda and not blockers else "dynamic"
    if decoding == "dynamic":
        return DynamicDecoder(model, batch, max_seqlen)
    if blockers:
        raise ConfigError(f"decoding {decoding!r} needs a fixed-shape step in every block; these have none: "
                          f"{', '.join(blockers)} (use decoding='dynamic')")
    if decoding == "cuda_graph" and not on_cuda:
        raise ConfigError(f"decoding 'cuda_graph' needs the model on CUDA, it is on {model.embed.weight.device}")
    return StaticDecoder(model, batch, max_seqlen, cuda_graph=decoding == "cuda_graph")
