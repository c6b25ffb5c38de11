"""HF transformers' Bamba (BambaForCausalLM) <-> HybridLM: config translation and weight map.

Every layer is a pre-norm residual mixer (Mamba2, or attention at `attn_layer_indices`) followed by a pre-norm
residual gated MLP: layout tokens "M2+F" and "A+F". The Mamba2 mixer is ours (in_proj [z, xBC, dt], gate then
grouped RMSNorm with rms_norm_eps). Attention is GQA with RoPE on the first half of each head only (Bamba fixes
partial_rotary_factor = 0.5): blocks.attention's rope_dim = head_dim / 2. z_loss_coefficient only changes the
training loss, not the logits, and is not carried over.
"""

from __future__ import annotations

import math

import torch

from blocks.attention import Attention, AttentionConfig
from blocks.mamba2 import Mamba2
from blocks.mlp import MLP
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
from hybrids.hf.mamba2 import bamba_style_mamba2, hf_mamba2, mamba2_weights
from hybrids.hf.zamba import same_config
from hybrids.model import HybridLM

ATTENTION_TYPES = ("full_attention", "attention")  # transformers 5 and 4 names of an attention layer


def rope_options(c, head_dim: int, family: str) -> dict:
    """blocks.attention RoPE options of an HF config's rope_parameters (transformers 5) or rope_theta (4)."""
    rope = dict(getattr(c, "rope_parameters", None) or {"rope_theta": getattr(c, "rope_theta", 10000.0)})
    require(rope.get("rope_type", "default") == "default",
            f"{family} RoPE type {rope.get('rope_type')!r} has no HybridLM equivalent (only 'default')")
    rope_dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    return dict(rope=True, rope_theta=float(rope.get("rope_theta", 10000.0)), rope_dim=rope_dim)


def config_from_hf(c) -> ModelConfig:
    """The HybridLM config of an HF BambaConfig."""
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    tokens = [("A" if kind in ATTENTION_TYPES else "M2") + "+F" for kind in c.layers_block_type]
    return ModelConfig(
        layout=layout_text(tokens),
        d_model=c.hidden_size,
        vocab_size=c.vocab_size,
        tie_embeddings=bool(c.tie_word_embeddings),
        norm_eps=c.rms_norm_eps,
        name=getattr(c, "name_or_path", "") or "bamba",
        blocks={
            "mamba2": bamba_style_mamba2("Bamba", c),
            "attention": dict(n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads, head_dim=head_dim,
                              softmax_scale=None, bias=bool(c.attention_bias), **rope_options(c, head_dim, "Bamba")),
            "mlp": dict(d_ff=c.intermediate_size, activation=activation_from_hf(c.hidden_act), gated=True,
                        bias=bool(c.mlp_bias)),
        },
    )


def attention_weights(w: WeightMap, a: Attention, p: str, in_scale: float = 1.0, k_scale: float = 1.0,
                      out_scale: float = 1.0) -> None:
    """q/k/v/o_proj under prefix p; HF multipliers on the input (in_scale), the keys and the output folded in."""
    w.scaled_params(a.q_proj, p + "q_proj.", 1.0, in_scale)
    w.scaled_params(a.k_proj, p + "k_proj.", k_scale, in_scale)
    w.scaled_params(a.v_proj, p + "v_proj.", 1.0, in_scale)
    w.scaled_params(a.o_proj, p + "o_proj.", out_scale)


def gated_mlp(w: WeightMap, mlp: MLP, p: str, gate_scale: float = 1.0, out_scale: float = 1.0) -> None:
    """HybridLM's fused [gate; up] from HF gate_proj and up_proj, and down_proj; HF multipliers on the gate
    projection's output and on the MLP's output folded in."""
    for name in ("weight", "bias") if mlp.config.bias else ("weight",):
        keys = (f"{p}gate_proj.{name}", f"{p}up_proj.{name}")
        w.custom(getattr(mlp.up_proj, name), keys, lambda gate, up: torch.cat([gate * gate_scale, up]),
                 lambda t: (t.chunk(2)[0] / gate_scale, t.chunk(2)[1]))
    w.scaled_params(mlp.down_proj, p + "down_proj.", out_scale)


def weight_map(model: HybridLM, hf_config, keys: set[str]) -> WeightMap:
    """HybridLM parameter <-> HF BambaForCausalLM state-dict entries."""
    w = WeightMap()
    embeddings(w, model)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        w.params(layer.mixer_norm, p + "input_layernorm.")
        w.params(layer.mlp_norm, p + "pre_ff_layernorm.")
        if isinstance(layer.mixer, Attention):
            attention_weights(w, layer.mixer, p + "self_attn.")
        else:
            mamba2_weights(w, layer.mixer, p + "mamba.")
        gated_mlp(w, layer.mlp, p + "feed_forward.")
    return w


def check_attention(a: AttentionConfig | None, d_model: int, family: str, rope_dim: str = "any") -> None:
    """HF attention of these families: projections from d_model, head_dim = d_model // n_heads, values as wide
    as keys, no window, the head_dim^-0.5 scale; rope_dim "half" (Bamba) or "full"."""
    if a is None:
        return
    require(a.d_input == d_model and a.head_dim * a.n_heads == d_model and a.v_head_dim == a.head_dim
            and a.window is None and math.isclose(a.softmax_scale or a.head_dim**-0.5, a.head_dim**-0.5),
            f"HF {family}'s attention has head_dim = d_model // n_heads, values as wide as keys, no window and "
            "the head_dim^-0.5 scale")
    if rope_dim == "half":
        require(a.rope and a.rope_dim * 2 == a.head_dim, f"HF {family} rotates half of each head: rope=True, "
                                                         "rope_dim = head_dim / 2")
    elif rope_dim == "full":
        require(a.rope and a.rope_dim == a.head_dim, f"HF {family} rotates whole heads: rope=True, rope_dim unset")


def hf_config(model: HybridLM):
    """The HF BambaConfig of a HybridLM whose layers are (Mamba2 | attention) + gated MLP."""
    from transformers import BambaConfig

    c = model.config
    require(not invocations(model), "HF Bamba has no shared blocks")
    layers = list(model.layers)
    require(all(isinstance(layer.mixer, (Mamba2, Attention)) and isinstance(layer.mlp, MLP) for layer in layers),
            "HF Bamba layers are a Mamba2 or attention mixer followed by an MLP")
    m = same_config([layer.mixer for layer in layers if isinstance(layer.mixer, Mamba2)], "Mamba2")
    a = same_config([layer.mixer for layer in layers if isinstance(layer.mixer, Attention)], "attention")
    f = same_config([layer.mlp for layer in layers], "MLP")
    require(m is not None, "HF Bamba needs at least one Mamba2 layer")
    require((m.gate_norm == "gated" and m.d_inner == m.expand * c.d_model and m.norm_eps == c.norm_eps),
            "HF Bamba's Mamba2 is expand * d_model wide, gates before its norm and uses the model's norm eps")
    check_attention(a, c.d_model, "Bamba", "half")
    require(f.gated and f.activation == "silu", "HF Bamba's MLP is gated SiLU (its activation is the Mamba2 conv's)")
    extra = hf_mamba2(m) | {"mamba_expand": m.expand}
    if a is not None:
        extra.update(num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, attention_bias=a.bias,
                     rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta})
    return BambaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=len(layers), intermediate_size=f.d_ff,
        hidden_act=activation_to_hf(f.activation), mlp_bias=f.bias, rms_norm_eps=c.norm_eps,
        attn_layer_indices=[i for i, layer in enumerate(layers) if isinstance(layer.mixer, Attention)],
        tie_word_embeddings=c.tie_embeddings, **extra,
    )
