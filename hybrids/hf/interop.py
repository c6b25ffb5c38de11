"""HF transformers interop: load the hybrid causal LMs of hybrids.hf.FAMILIES into HybridLM, and export them back.

`from_hf` translates the HF config (`config_from_hf`), builds the HybridLM and copies every weight with
its re-layout; `to_hf` builds the HF model of a HybridLM and copies the weights the other way. A family
module (hybrids.hf.zamba, .zamba2, .jamba, .bamba, .falcon_h1, .nemotron_h, .granitemoehybrid) states,
for every HybridLM parameter, the HF state-dict entries it is made of (a `WeightMap` of `Link`s); it provides
config_from_hf(hf_config), weight_map(model, hf_config, hf_keys) and hf_config(model). Both directions check that every
HF tensor is used and every HybridLM parameter is written; a tied HF tensor (the shared block repeated
in every hybrid layer, a tied LM head) is an alias that must equal its canonical entry. Constant HF
multipliers (Falcon-H1's µP multipliers, GraniteMoeHybrid's residual and embedding multipliers) are folded
into the weights they scale (`WeightMap.scaled`): the logits are equal, and an exported model has multipliers 1.

transformers is imported only when these functions run: the model code itself does not need it.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blocks import ConfigError
from hybrids.config import ModelConfig, load_config
from hybrids.hf import FAMILIES
from hybrids.layout import parse_layout
from hybrids.model import HybridLM

__all__ = ["ConfigError", "Link", "WeightMap", "config_from_hf", "from_hf", "to_hf"]

ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu", "swish": "silu", "relu": "relu",
               "relu2": "relu2"}


def _first(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _single(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (tensor,)


@dataclass(frozen=True)
class Link:
    """One HybridLM parameter and the HF state-dict entries it is made of.

    load: HF tensors (in `keys` order) -> the parameter's value; store: the parameter -> HF tensors.
    """

    param: nn.Parameter
    keys: tuple[str, ...]
    load: Callable[..., torch.Tensor] = _first
    store: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] = _single


@dataclass
class WeightMap:
    """Links for every parameter, HF keys that must be zero, and tied HF prefixes (duplicate -> canonical)."""

    links: list[Link] = field(default_factory=list)
    zeros: list[str] = field(default_factory=list)
    aliases: list[tuple[str, str]] = field(default_factory=list)

    def same(self, param: nn.Parameter, key: str) -> None:
        self.links.append(Link(param, (key,)))

    def params(self, module: nn.Module, prefix: str) -> None:
        """Each direct parameter of `module` (weight, bias) to the HF entry of the same name under `prefix`."""
        for name, param in module.named_parameters(recurse=False):
            self.same(param, prefix + name)

    def fused(self, param: nn.Parameter, keys: tuple[str, ...]) -> None:
        """A parameter stacked from equal-sized HF tensors along dim 0 (e.g. [gate; up])."""
        self.links.append(Link(param, keys, lambda *ts: torch.cat(ts), lambda t: t.chunk(len(keys))))

    def reshaped(self, param: nn.Parameter, key: str, hf_shape: tuple[int, ...]) -> None:
        shape = tuple(param.shape)
        self.links.append(Link(param, (key,), lambda t: t.reshape(shape), lambda t: (t.reshape(hf_shape),)))

    def custom(self, param: nn.Parameter, keys: tuple[str, ...], load: Callable[..., torch.Tensor],
               store: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]) -> None:
        self.links.append(Link(param, keys, load, store))

    def scaled(self, param: nn.Parameter, key: str, scale: float | torch.Tensor) -> None:
        """A parameter equal to the HF entry times `scale` (a number, or a tensor broadcasting against it):
        an HF multiplier folded into the weight it follows."""
        self.links.append(Link(param, (key,), lambda t: t * scale, lambda t: (t / scale,)))

    def scaled_params(self, module: nn.Module, prefix: str, scale: float | torch.Tensor = 1.0,
                      in_scale: float = 1.0) -> None:
        """`params` of a Linear whose output HF scales by `scale` (per output row, or one number) and whose
        input by `in_scale`: weight * scale * in_scale, bias * scale."""
        rows = scale[:, None] if isinstance(scale, torch.Tensor) else scale
        self.scaled(module.weight, prefix + "weight", rows * in_scale)
        if module.bias is not None:
            self.scaled(module.bias, prefix + "bias", scale)

    def alias(self, duplicate: str, canonical: str) -> None:
        """HF entries under prefix `duplicate` are tied to the same names under `canonical`."""
        self.aliases.append((duplicate, canonical))

    def canonical(self, key: str) -> str | None:
        for duplicate, canonical in self.aliases:
            if key.startswith(duplicate):
                return canonical + key[len(duplicate):]
        return None


def _names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def _check_links(model: nn.Module, weights: WeightMap) -> None:
    names, seen = _names(model), set()
    for link in weights.links:
        if id(link.param) not in names:
            raise ConfigError(f"weight map links a tensor that is not a parameter of the model ({link.keys})")
        if id(link.param) in seen:
            raise ConfigError(f"weight map writes parameter {names[id(link.param)]} twice")
        seen.add(id(link.param))
    missing = [name for pid, name in names.items() if pid not in seen]
    if missing:
        raise ConfigError(f"no HF weights for {len(missing)} HybridLM parameter(s): {', '.join(missing[:8])}")


def _leftovers(state: dict[str, torch.Tensor], used: set[str], weights: WeightMap) -> list[tuple[str, str | None]]:
    """(key, canonical key or None) for every HF entry no link used."""
    return [(key, weights.canonical(key)) for key in state if key not in used]


def load_weights(model: nn.Module, weights: WeightMap, state: dict[str, torch.Tensor]) -> None:
    """Copy HF tensors into the model; fail unless every HF entry and every parameter is accounted for."""
    _check_links(model, weights)
    names, used = _names(model), set()
    for link in weights.links:
        absent = [k for k in link.keys if k not in state]
        if absent:
            raise ConfigError(f"the HF model has no {', '.join(absent)} (needed for {names[id(link.param)]})")
        value = link.load(*(state[k] for k in link.keys))
        if value.shape != link.param.shape:
            raise ConfigError(f"{names[id(link.param)]}: HF {', '.join(link.keys)} gives shape "
                              f"{tuple(value.shape)}, expected {tuple(link.param.shape)}")
        link.param.copy_(value)
        used.update(link.keys)
    for key in weights.zeros:
        if key in state and bool(state[key].any()):
            raise ConfigError(f"HF {key} is non-zero but the HybridLM config has no place for it")
        used.add(key)
    unused = []
    for key, canonical in _leftovers(state, used, weights):
        if canonical is None or canonical not in used:
            unused.append(key)
        elif not torch.equal(state[key], state[canonical]):
            raise ConfigError(f"HF {key} should be tied to {canonical} but differs from it")
    if unused:
        raise ConfigError(f"{len(unused)} HF tensor(s) have no place in the HybridLM: {', '.join(unused[:8])}")


def store_weights(model: nn.Module, weights: WeightMap, state: dict[str, torch.Tensor]) -> None:
    """Copy the model's parameters into HF tensors (views of the HF parameters), with the same checks."""
    _check_links(model, weights)
    written = set()
    for link in weights.links:
        values = link.store(link.param.detach())
        for key, value in zip(link.keys, values, strict=True):
            if key not in state or state[key].shape != value.shape:
                got = tuple(state[key].shape) if key in state else "no such entry"
                raise ConfigError(f"HF {key}: expected shape {tuple(value.shape)}, the HF model has {got}")
            state[key].copy_(value)
            written.add(key)
    for key in weights.zeros:
        if key not in state:
            raise ConfigError(f"HF {key}: expected an entry to set to zero, the HF model has none")
        state[key].zero_()
        written.add(key)
    unwritten = []
    for key, canonical in _leftovers(state, written, weights):
        if canonical is None or canonical not in written:
            unwritten.append(key)
        else:
            state[key].copy_(state[canonical])  # a no-op where HF really ties them
    if unwritten:
        raise ConfigError(f"{len(unwritten)} HF tensor(s) were not written: {', '.join(unwritten[:8])}")


def layout_text(tokens: Iterable[str]) -> str:
    """Compact canonical layout text for a flat token sequence such as ["M", "M", "A*", "M"] -> "2M:A*:M".

    Equal neighbours merge into counts; a repeating period that starts with a backbone layer becomes a
    group ("(6M:A*)x11"), choosing at each position the period that saves the most tokens.
    """
    runs: list[list] = []
    for token in tokens:
        if runs and runs[-1][0] == token:
            runs[-1][1] += 1
        else:
            runs.append([token, 1])
    items = [f"{n if n > 1 else ''}{token}" for token, n in runs]
    out, i = [], 0
    while i < len(items):
        best = (0, 1, 1)  # (saved items, period, repeats)
        if "*" not in items[i]:
            for period in range(1, (len(items) - i) // 2 + 1):
                repeats = 1
                while items[i + repeats * period: i + (repeats + 1) * period] == items[i: i + period]:
                    repeats += 1
                if repeats > 1 and period * (repeats - 1) > best[0]:
                    best = (period * (repeats - 1), period, repeats)
        _, period, repeats = best
        out.append(f"({':'.join(items[i: i + period])})x{repeats}" if repeats > 1 else items[i])
        i += period * repeats
    return str(parse_layout(":".join(out)))


def activation_from_hf(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ConfigError(f"HF activation {name!r} has no HybridLM equivalent; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def activation_to_hf(name: str) -> str:
    return {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu", "relu": "relu", "relu2": "relu2"}[name]


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def invocations(model: HybridLM) -> list[tuple[int, str, int]]:
    """(HF layer it feeds, shared key, invocation index within that key) for every shared invocation."""
    calls = [entry for entry in model.plan if entry[0] != "layer"]
    require(all(entry[0] == "shared" for entry in calls),
            "only the shared attention block ('A*') exists in HF hybrids; the layout shares another block")
    return [(layer, key, j) for layer, (_, key, j) in zip(model.layout.invocation_layers, calls, strict=True)]


def embeddings(w: WeightMap, model: HybridLM, embed: str = "model.embed_tokens.weight",
               norm: str = "model.final_layernorm.", embed_scale: float = 1.0, logits_scale: float = 1.0) -> None:
    """Embedding, final norm and LM head (tied or not); HF multiplies the embeddings by embed_scale and the
    logits by logits_scale. A tied head folds both into one matrix, so they must be equal."""
    w.scaled(model.embed.weight, embed, embed_scale)
    w.params(model.norm, norm)
    if model.config.tie_embeddings:
        require(math.isclose(embed_scale, logits_scale),
                f"tied embeddings with an embedding multiplier ({embed_scale}) other than the logits multiplier "
                f"({logits_scale}) have no HybridLM equivalent")
        w.alias("lm_head.weight", embed)
    else:
        w.scaled(model.lm_head.weight, "lm_head.weight", logits_scale)


def _family(model_type: str):
    if model_type not in FAMILIES:
        raise ConfigError(f"HF model type {model_type!r} is not supported; supported: {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[model_type])


def config_from_hf(hf_config: Any) -> ModelConfig:
    """The HybridLM config equivalent to an HF config of a family in hybrids.hf.FAMILIES (ZambaConfig, ...).

    Args:
        hf_config: the transformers config (e.g. `model.config`).
    Returns:
        A ModelConfig whose layout and block options reproduce the HF architecture.
    Raises:
        ConfigError: an unsupported model type, or an HF option HybridLM cannot express.
    """
    return _family(getattr(hf_config, "model_type", None)).config_from_hf(hf_config)


HF_PREFIX = "hf:"


def config_from_source(source: str) -> ModelConfig:
    """The ModelConfig of an HF model directory (read from its config.json, no weights loaded) or of an HF
    family's default configuration ("hf:bamba": transformers' BambaConfig() defaults).

    Raises:
        ConfigError: an unknown family, or an HF option HybridLM cannot express.
    """
    auto = _transformers().AutoConfig
    if source.startswith(HF_PREFIX):
        model_type = source[len(HF_PREFIX):]
        _family(model_type)
        return config_from_hf(auto.for_model(model_type))
    return config_from_hf(auto.from_pretrained(source, local_files_only=True))


def _transformers():
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise ConfigError("HF interop needs transformers: pip install transformers") from None


def _load_hf(source: Any, allow_remote: bool):
    if isinstance(source, nn.Module):
        model_type = getattr(getattr(source, "config", None), "model_type", None)
        _family(model_type)
        require(isinstance(getattr(source, "lm_head", None), nn.Linear),
                f"give the causal LM ({model_type} ...ForCausalLM), not a model without an LM head")
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"from_hf takes an HF model or a local directory, got {type(source).__name__}")
    auto = _transformers().AutoModelForCausalLM
    path = Path(source)
    if path.is_dir():
        require((path / "config.json").is_file(), f"{path} has no config.json: not a saved HF model")
        return auto.from_pretrained(path, local_files_only=True)
    require(allow_remote, f"{str(source)!r} is not a local directory. Remote models must be downloaded first "
                          f"(e.g. `hf download {source} --local-dir DIR`, then from_hf(DIR)), "
                          "or pass allow_remote=True to let transformers fetch it")
    return auto.from_pretrained(str(source))


def from_hf(source: Any, *, allow_remote: bool = False, **overrides: Any) -> HybridLM:
    """A HybridLM with the weights of an HF causal LM of a family in hybrids.hf.FAMILIES.

    The translated layout is `model.config.layout` (`hybrids info DIR` prints it).

    Args:
        source: a ZambaForCausalLM, BambaForCausalLM, ... instance, or a local directory
            saved with `save_pretrained` (loaded with local_files_only=True).
        allow_remote: let transformers download `source` when it is not a local directory.
        overrides: ModelConfig fields or dotted keys applied to the translated config (e.g. backend="torch").
    Returns:
        The HybridLM (default dtype, CPU), computing the same logits as the HF model.
    Raises:
        ConfigError: a missing directory, an unsupported model or option, or weights that do not map
            one-to-one (an HF tensor without a place, or a parameter without an HF tensor).
    """
    hf = _load_hf(source, allow_remote)
    family = _family(hf.config.model_type)
    config = load_config(family.config_from_hf(hf.config), **overrides)
    model = HybridLM(config)
    state = hf.state_dict()
    with torch.no_grad():
        load_weights(model, family.weight_map(model, hf.config, set(state)), state)
    return model


def family_of(model: HybridLM) -> str:
    """The HF model type a HybridLM exports to by default (see `to_hf`)."""
    kinds = {type(block).__name__ for layer in model.layers for block in (layer.mixer, layer.mlp) if block}
    if model.shared or kinds == {"Mamba"}:
        return "zamba2" if "Mamba2" in kinds else "zamba"
    if "Parallel" in kinds:
        return "falcon_h1"
    if "Mamba" in kinds:
        return "jamba"
    if any(layer.mixer is None or layer.mlp is None for layer in model.layers):
        return "nemotron_h"
    return "granitemoehybrid" if "MoE" in kinds else "bamba"


def to_hf(model: HybridLM, family: str | None = None):
    """The HF causal LM computing the same logits as `model`.

    By default the family follows from the blocks (`family_of`): shared attention -> Zamba2 (Mamba2 layers)
    or Zamba (Mamba layers, also without shared attention); parallel layers -> Falcon-H1; Mamba (v1) layers
    with an MLP or MoE -> Jamba; layers of one block each -> NemotronH; Mamba2 / attention layers with an MoE
    -> GraniteMoeHybrid, with an MLP -> Bamba.

    Args:
        model: a HybridLM whose layout and options one of the HF families can express.
        family: the HF model type to export to (e.g. "granitemoehybrid" for MLP-only layers), if not the default.
    Returns:
        The transformers model in eval mode, in the dtype of `model`'s embeddings.
    Raises:
        ConfigError: the model uses something the HF family cannot express (named in the message).
    """
    family = _family(family or family_of(model))
    hf_config = family.hf_config(model)
    hf = _transformers().AutoModelForCausalLM.from_config(hf_config)
    state = hf.state_dict()
    with torch.no_grad():
        store_weights(model, family.weight_map(model, hf_config, set(state)), state)
    return hf.to(model.embed.weight.dtype).eval()
