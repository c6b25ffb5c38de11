"""HF transformers' Zamba2 (Zamba2ForCausalLM) <-> HybridLM: config translation and weight map.

As in Zamba, a "hybrid" layer runs a shared transformer and adds its projected output to the input of
its Mamba2 layer. With num_mem_blocks = n, hybrid layer number g (counting hybrid layers only) uses
block g % n: HybridLM's round-robin "A*n", shared keys "A_0" ... "A_{n-1}". Each block holds adapter
slots for every hybrid layer and fills only its own (indexed by g, `layer_dic`), so invocation j of
set s is hybrid layer g = j * n + s and reads slot g of block s: MLP adapters always (adapter_rank),
q/k/v adapters when use_shared_attention_adapter. The Mamba2 mixer's in_proj is [z, xBC, dt] as ours.
"""

from __future__ import annotations

import math

import torch

from blocks.mamba2 import Mamba2
from blocks.shared import SharedAttention
from hybrids.config import ModelConfig
from hybrids.hf.interop import (
    WeightMap,
    activation_from_hf,
    activation_to_hf,
    embeddings,
    invocations,
    require,
)
from hybrids.hf.mamba2 import mamba2_weights
from hybrids.hf.zamba import backbone_weights, same_config, shared_config, star_layout
from hybrids.model import HybridLM

NORM_EPS = 1e-5  # HF's Zamba2RMSNormGated in the mixer is built with eps=1e-5, whatever the config says
# HF clamps dt from below at time_step_min and takes its log at init, so "no clamp" (dt_limit[0] = 0)
# exports as the smallest normal float32: it changes nothing but an exact underflow of softplus.
NO_CLAMP = float(torch.finfo(torch.float32).tiny)


def config_from_hf(c) -> ModelConfig:
    """The HybridLM config of an HF Zamba2Config."""
    d_inner = c.mamba_expand * c.hidden_size
    require(d_inner == int(d_inner), f"Zamba2 mamba_expand * hidden_size must be an integer, got {d_inner}")
    require(not c.add_bias_linear, "Zamba2 add_bias_linear=True is not supported: the shared MLP has no bias")
    # transformers 5 keeps rope_theta in rope_parameters, transformers 4 as an attribute
    rope = getattr(c, "rope_parameters", None) or {"rope_theta": getattr(c, "rope_theta", 10000.0)}
    require(not c.use_mem_rope or rope.get("rope_type", "default") == "default",
            f"Zamba2 RoPE type {rope.get('rope_type')!r} is not supported (only 'default')")
    require(not c.use_shared_attention_adapter or c.num_key_value_heads == c.num_attention_heads,
            "Zamba2 attention adapters need num_key_value_heads == num_attention_heads")
    n = c.num_mem_blocks
    chunk = c.chunk_size if c.chunk_size > 0 and c.chunk_size & (c.chunk_size - 1) == 0 else 256
    return ModelConfig(
        layout=star_layout(list(c.layers_block_type), "M2", "A*" if n == 1 else f"A*{n}"),
        d_model=c.hidden_size,
        vocab_size=c.vocab_size,
        tie_embeddings=bool(c.tie_word_embeddings),
        norm_eps=c.rms_norm_eps,
        inject="next",
        name=getattr(c, "name_or_path", "") or "zamba2",
        blocks={
            "mamba2": dict(d_state=c.mamba_d_state, d_conv=c.mamba_d_conv, expand=int(c.mamba_expand),
                           headdim=c.mamba_headdim, ngroups=c.mamba_ngroups, chunk_size=chunk, conv_bias=True,
                           bias=False, norm_eps=NORM_EPS, dt_min=c.time_step_min, dt_max=c.time_step_max,
                           dt_init_floor=c.time_step_floor, dt_limit=(c.time_step_min, math.inf)),
            "shared_attention": dict(n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads,
                                     head_dim=c.attention_head_dim, d_ff=c.intermediate_size,
                                     activation=activation_from_hf(c.hidden_act), concat_embeddings=True,
                                     rope=bool(c.use_mem_rope), rope_theta=float(rope.get("rope_theta", 10000.0)),
                                     lora_rank=c.adapter_rank,
                                     attn_lora_rank=c.adapter_rank if c.use_shared_attention_adapter else 0,
                                     out_proj=True, norm_eps=c.rms_norm_eps),
        },
    )


def _shared(w: WeightMap, s: SharedAttention, q: str) -> None:
    w.params(s.input_norm, q + "input_layernorm.")
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        w.params(getattr(s.attn, name), f"{q}self_attn.{name}.")
    w.params(s.pre_ff_norm, q + "pre_ff_layernorm.")
    w.params(s.mlp.up_proj, q + "feed_forward.gate_up_proj.")
    w.params(s.mlp.down_proj, q + "feed_forward.down_proj.")


def weight_map(model: HybridLM, hf_config, keys: set[str]) -> WeightMap:
    """HybridLM parameter <-> HF Zamba2ForCausalLM state-dict entries."""
    w = WeightMap()
    embeddings(w, model)
    calls = invocations(model)
    backbone_weights(w, model, calls, mamba2_weights)
    canonical: dict[str, str] = {}  # shared key -> HF prefix of its first hybrid layer
    for g, (layer, key, j) in enumerate(calls):
        if key not in canonical:
            canonical[key] = f"model.layers.{layer}.shared_transformer."
            _shared(w, model.shared[key], canonical[key])
        else:
            w.alias(f"model.layers.{layer}.shared_transformer.", canonical[key])
        q, inv = canonical[key], model.shared[key].invocations[j]
        w.params(inv.out_proj, f"model.layers.{layer}.linear.")
        mlp_slot = f"{q}feed_forward.gate_up_proj_adapter_list.{g}."
        if inv.mlp_lora is not None:
            w.params(inv.mlp_lora[0], mlp_slot + "0.")
            w.params(inv.mlp_lora[1], mlp_slot + "1.")
        else:  # HF always has MLP adapters; a HybridLM without them exports zero ones
            w.zeros += [mlp_slot + "0.weight", mlp_slot + "1.weight"]
        for name, adapter in zip("qkv", inv.qkv_lora or (), strict=False):
            w.params(adapter[0], f"{q}self_attn.linear_{name}_adapter_list.{g}.0.")
            w.params(adapter[1], f"{q}self_attn.linear_{name}_adapter_list.{g}.1.")
    return w


def hf_config(model: HybridLM):
    """The HF Zamba2Config of a HybridLM made of Mamba2 layers and round-robin shared attention blocks."""
    from transformers import Zamba2Config

    c = model.config
    require(all(isinstance(layer.mixer, Mamba2) and layer.mlp is None for layer in model.layers),
            "HF Zamba2 layers are Mamba2 mixers without an MLP")
    m = same_config([layer.mixer for layer in model.layers], "Mamba2")
    require(m.conv_bias and not m.bias, "HF Zamba2's Mamba2 has a conv bias and no projection biases")
    require(m.gate_norm == "gated" and m.d_inner == m.expand * c.d_model,
            "HF Zamba2's Mamba2 is expand * d_model wide and gates before its norm (gate_norm='gated')")
    require(m.norm_eps == NORM_EPS, f"HF Zamba2's gated norm uses eps {NORM_EPS}")
    require(m.dt_limit[1] == math.inf, "HF Zamba2 clamps dt only from below (time_step_min)")
    calls = invocations(model)
    require(bool(calls), "HF Zamba2 needs at least one shared invocation (its generation cache needs an "
                         "attention layer); a pure Mamba layout has no Zamba2 equivalent")
    keys = list(dict.fromkeys(key for _, key, _ in calls))
    n = max(len(keys), 1)
    require(all(key == keys[g % n] for g, (_, key, _) in enumerate(calls)),
            "HF Zamba2 assigns its shared blocks in turn (A, B, A, B ...): use a round-robin layout 'A*n'")
    s = shared_config(model, calls)
    extra = {}
    if s is not None:
        require(s.lora_rank == 0 or s.attn_lora_rank in (0, s.lora_rank),
                "HF Zamba2 has one adapter_rank for the MLP and attention adapters")
        attn = model.shared[keys[0]].attn.config
        require(attn.head_dim == 2 * c.d_model // attn.n_heads,
                "HF Zamba2's attention head_dim is 2 * d_model // n_heads")
        extra = dict(num_attention_heads=attn.n_heads, num_key_value_heads=attn.n_kv_heads,
                     intermediate_size=model.shared[keys[0]].mlp.config.d_ff,
                     hidden_act=activation_to_hf(s.activation), use_mem_rope=s.rope,
                     rope_parameters={"rope_type": "default", "rope_theta": s.rope_theta},
                     adapter_rank=max(s.lora_rank, s.attn_lora_rank, 1),
                     use_shared_attention_adapter=s.attn_lora_rank > 0)
    hybrid = {layer for layer, _, _ in calls}
    return Zamba2Config(
        vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=len(model.layers),
        layers_block_type=["hybrid" if i in hybrid else "linear_attention" for i in range(len(model.layers))],
        mamba_d_state=m.d_state, mamba_d_conv=m.d_conv, mamba_expand=m.expand, mamba_ngroups=m.ngroups,
        n_mamba_heads=m.n_heads, chunk_size=m.chunk_size, use_conv_bias=True, add_bias_linear=False,
        time_step_min=m.dt_limit[0] or NO_CLAMP, time_step_max=m.dt_max, time_step_floor=m.dt_init_floor,
        num_mem_blocks=n, rms_norm_eps=c.norm_eps, tie_word_embeddings=c.tie_embeddings, **extra,
    )
