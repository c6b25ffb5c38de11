"""HF transformers' Zamba (ZambaForCausalLM) <-> HybridLM: config translation and weight map.

HF builds one layer per Mamba layer; a "hybrid" layer i first runs the shared transformer on the
residual stream (concatenated with the embeddings), projects it with its own Linear(h, h) and adds it
to the input of Mamba layer i before that layer's norm: HybridLM's "A*" just before layer i, inject="next".
The shared block's weights appear in every hybrid layer (tied); the first occurrence is canonical.

HF's Zamba Mamba mixer interleaves its in_proj rows per channel: row 2c is x channel c, row 2c + 1
is z channel c (`view(batch, -1, 2, seq_len)`); HybridLM's Mamba takes [x; z]. Its per-head x_proj and
dt_proj weights are HybridLM's parameters as they are; dt bias, A_log and D are stored per head.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from blocks.mamba import Mamba
from blocks.shared import SharedAttention
from hybrids.config import ModelConfig
from hybrids.hf.interop import (
    WeightMap,
    activation_from_hf,
    activation_to_hf,
    embeddings,
    invocations,
    layout_text,
    require,
)
from hybrids.model import HybridLM

MAMBA_TYPES = ("mamba", "linear_attention")  # transformers 4.x and 5.x names of a plain Mamba layer


def hybrid_layers(layer_types: list[str]) -> list[bool]:
    """Whether each HF layer is a hybrid layer (a shared-block invocation feeds it)."""
    unknown = sorted(set(layer_types) - {"hybrid", *MAMBA_TYPES})
    require(not unknown, f"unknown HF layer type(s) {unknown}; expected 'hybrid' or one of {MAMBA_TYPES}")
    return [t == "hybrid" for t in layer_types]


def star_layout(layer_types: list[str], layer: str, star: str) -> str:
    """Layout text with `star` right before every hybrid layer, e.g. [m, m, h, m] -> "2M:A*:2M"."""
    tokens: list[str] = []
    for hybrid in hybrid_layers(layer_types):
        tokens += [star, layer] if hybrid else [layer]
    return layout_text(tokens)


def config_from_hf(c) -> ModelConfig:
    """The HybridLM config of an HF ZambaConfig."""
    require(c.attention_hidden_size == 2 * c.hidden_size,
            f"Zamba attention_hidden_size must be 2 * hidden_size (the concatenated input), got "
            f"{c.attention_hidden_size} for hidden_size {c.hidden_size}")
    require(c.hidden_mamba_act == "silu", f"Zamba hidden_mamba_act must be 'silu', got {c.hidden_mamba_act!r}")
    return ModelConfig(
        layout=star_layout(list(c.layers_block_type), "M", "A*"),
        d_model=c.hidden_size,
        vocab_size=c.vocab_size,
        tie_embeddings=bool(c.tie_word_embeddings),
        norm_eps=c.rms_norm_eps,
        inject="next",
        name=getattr(c, "name_or_path", "") or "zamba",
        blocks={
            "mamba": dict(d_state=c.mamba_d_state, d_conv=c.mamba_d_conv, expand=c.mamba_expand,
                          dt_rank=c.mamba_dt_rank, n_heads=c.n_mamba_heads, conv_bias=c.mamba_conv_bias,
                          bias=c.mamba_proj_bias, dt_min=c.time_step_min, dt_max=c.time_step_max,
                          dt_init_floor=c.time_step_floor),
            "shared_attention": dict(n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads,
                                     head_dim=c.attention_head_dim, d_ff=c.intermediate_size,
                                     activation=activation_from_hf(c.hidden_act), concat_embeddings=True,
                                     rope=False, lora_rank=0, attn_lora_rank=0, out_proj=True,
                                     norm_eps=c.rms_norm_eps),
        },
    )


def _from_interleaved(t: torch.Tensor) -> torch.Tensor:
    """Rows [x0, z0, x1, z1, ...] -> [x; z]."""
    return t.unflatten(0, (-1, 2)).transpose(0, 1).flatten(0, 1)


def _to_interleaved(t: torch.Tensor) -> torch.Tensor:
    """Rows [x; z] -> [x0, z0, x1, z1, ...]."""
    return (t.unflatten(0, (2, -1)).transpose(0, 1).flatten(0, 1),)


def _mamba(w: WeightMap, m: Mamba, p: str) -> None:
    c = m.config
    heads, k = c.n_heads, c.d_inner // c.n_heads
    for name, param in m.in_proj.named_parameters():
        w.custom(param, (p + "in_proj." + name,), _from_interleaved, _to_interleaved)
    w.params(m.conv1d, p + "conv1d.")
    w.same(m.x_proj, p + "x_proj_weight")  # (heads, dt_rank + 2 * d_state, k) in both
    w.same(m.dt_proj, p + "dt_proj_weight")  # (heads, k, dt_rank) in both
    w.reshaped(m.dt_bias, p + "dt_proj_bias", (heads, k))
    w.reshaped(m.A_log, p + "A_log", (heads, k, c.d_state))
    w.reshaped(m.D, p + "D", (heads, k))
    w.params(m.out_proj, p + "out_proj.")


def _shared(w: WeightMap, s: SharedAttention, q: str) -> None:
    """The weights every invocation uses, from HF's shared transformer under prefix q."""
    w.params(s.input_norm, q + "input_layernorm.")
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        w.params(getattr(s.attn, name), f"{q}self_attn.{name}.")
    w.params(s.pre_ff_norm, q + "pre_ff_layernorm.")


def backbone_weights(w: WeightMap, model: HybridLM, calls: list[tuple[int, str, int]], mixer) -> None:
    """Map the backbone layers of a Zamba-family model: HF nests a hybrid layer's Mamba under mamba_decoder.

    Args:
        mixer: maps one mixer, e.g. `_mamba(w, mixer, prefix)`.
    """
    hybrid = {layer for layer, _, _ in calls}
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}." + ("mamba_decoder." if i in hybrid else "")
        w.params(layer.mixer_norm, p + "input_layernorm.")
        mixer(w, layer.mixer, p + "mamba.")


def weight_map(model: HybridLM, hf_config, keys: set[str]) -> WeightMap:
    """HybridLM parameter <-> HF ZambaForCausalLM state-dict entries."""
    w = WeightMap()
    embeddings(w, model)
    calls = invocations(model)
    backbone_weights(w, model, calls, _mamba)
    if calls:
        q = f"model.layers.{calls[0][0]}.shared_transf."
        s = model.shared[calls[0][1]]
        _shared(w, s, q)
        w.fused(s.mlp.up_proj.weight, (q + "feed_forward.gate_proj.weight", q + "feed_forward.up_proj.weight"))
        w.params(s.mlp.down_proj, q + "feed_forward.down_proj.")
    for layer, key, j in calls:
        w.params(model.shared[key].invocations[j].out_proj, f"model.layers.{layer}.linear.")
        if layer != calls[0][0]:
            w.alias(f"model.layers.{layer}.shared_transf.", q)
    return w


def same_config(blocks: list, what: str):
    """The one config every block in `blocks` has (HF has a single config per block type)."""
    configs = {repr(dataclasses.asdict(b.config)) for b in blocks}
    require(len(configs) <= 1, f"HF needs one {what} config for every layer; the model mixes {len(configs)}")
    return blocks[0].config if blocks else None


def shared_config(model: HybridLM, calls: list[tuple[int, str, int]]):
    """The shared attention config (equal in every weight set, up to n_invocations), checked for HF."""
    blocks = [model.shared[key] for key in dict.fromkeys(key for _, key, _ in calls)]
    require(all(isinstance(b, SharedAttention) for b in blocks), "HF hybrids share only the attention block")
    layers = [layer for layer, _, _ in calls]
    require(len(set(layers)) == len(layers) and all(i < len(model.layers) for i in layers),
            "HF feeds at most one shared invocation into each layer, and none after the last layer; "
            f"the layout's invocations feed layers {layers}")
    require(model.config.inject == "next", "HF adds the shared output to the next layer's input: inject='next'")
    configs = {repr(dataclasses.replace(b.config, n_invocations=1)) for b in blocks}
    require(len(configs) <= 1, "HF needs the same options for every shared weight set")
    if not blocks:
        return None
    s = blocks[0].config
    attn = blocks[0].attn.config
    require(s.concat_embeddings and s.out_proj, "HF's shared block concatenates the embeddings and has out_proj")
    require(math.isclose(attn.softmax_scale, (attn.head_dim / 2) ** -0.5),
            "HF's shared attention scales by (head_dim/2)^-0.5")
    require(s.norm_eps == model.config.norm_eps, "HF uses one rms_norm_eps for the shared block and the layers")
    return s


def hf_config(model: HybridLM):
    """The HF ZambaConfig of a HybridLM made of Mamba layers and one shared attention block."""
    from transformers import ZambaConfig

    c = model.config
    require(all(isinstance(layer.mixer, Mamba) and layer.mlp is None for layer in model.layers),
            "HF Zamba layers are Mamba mixers without an MLP")
    m = same_config([layer.mixer for layer in model.layers], "Mamba")
    require(not m.inner_norms, "HF Zamba's Mamba has no inner norms")
    calls = invocations(model)
    require(bool(calls), "HF Zamba needs at least one shared invocation (its generation cache needs an "
                         "attention layer); a pure Mamba layout has no Zamba equivalent")
    require(len({key for _, key, _ in calls}) <= 1, "HF Zamba has one shared weight set ('A*')")
    require(len(calls) != 1 or not c.tie_embeddings,
            "transformers' ZambaForCausalLM cannot be built with tied embeddings and exactly one hybrid layer "
            "(its tied-weights pattern for the shared block then matches nothing); untie the embeddings")
    s = shared_config(model, calls)
    extra = {}
    if s is not None:
        require(s.lora_rank == 0 and s.attn_lora_rank == 0 and not s.rope,
                "HF Zamba's shared block has no LoRA and no RoPE (Zamba2 has them)")
        attn = model.shared[calls[0][1]].attn.config
        extra = dict(num_attention_heads=attn.n_heads, num_key_value_heads=attn.n_kv_heads,
                     attention_head_dim=attn.head_dim, intermediate_size=model.shared[calls[0][1]].mlp.config.d_ff,
                     hidden_act=activation_to_hf(s.activation))
    hybrid = {layer for layer, _, _ in calls}
    return ZambaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=len(model.layers),
        layers_block_type=["hybrid" if i in hybrid else "linear_attention" for i in range(len(model.layers))],
        attention_hidden_size=2 * c.d_model, n_mamba_heads=m.n_heads, hidden_mamba_act="silu",
        mamba_d_state=m.d_state, mamba_d_conv=m.d_conv, mamba_expand=m.expand, mamba_dt_rank=m.dt_rank,
        mamba_conv_bias=m.conv_bias, mamba_proj_bias=m.bias, time_step_min=m.dt_min, time_step_max=m.dt_max,
        time_step_floor=m.dt_init_floor, rms_norm_eps=c.norm_eps, tie_word_embeddings=c.tie_embeddings, **extra,
    )
