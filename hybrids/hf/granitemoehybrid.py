"""HF transformers' GraniteMoeHybrid (GraniteMoeHybridForCausalLM) <-> HybridLM: config translation, weight map.

Every layer is a pre-norm residual mixer (Mamba2, or attention where layer_types says so) and a pre-norm
residual MoE whose shared MLP (shared_mlp, gated) runs beside the routed experts: layout tokens "M2+E" / "A+E"
with blocks.moe shared_d_ff = shared_intermediate_size; with num_local_experts = 0 the shared MLP alone is the
layer's MLP ("M2+F"). The router softmaxes the top-k logits, which is the full softmax renormalised over the top
k (normalize_top_k). Attention scales scores by attention_multiplier and has RoPE only with
position_embedding_type="rope".

Multipliers fold into weights: residual_multiplier (on both residual branches) into the mixers' output
projections, the experts' and shared MLP's down projections; embedding_multiplier into the embedding; the
logits divisor logits_scaling into the LM head (a tied head needs embedding_multiplier == 1 / logits_scaling).
The router's auxiliary loss coefficient only changes the training loss.
"""

from __future__ import annotations

from blocks.attention import Attention
from blocks.mamba2 import Mamba2
from blocks.mlp import MLP
from blocks.moe import MoE
from hybrids.config import ModelConfig
from hybrids.hf.bamba import ATTENTION_TYPES, attention_weights, rope_options
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


def config_from_hf(c) -> ModelConfig:
    """The HybridLM config of an HF GraniteMoeHybridConfig."""
    head_dim = c.hidden_size // c.num_attention_heads
    experts = c.num_local_experts > 0
    tokens = [("A" if kind in ATTENTION_TYPES else "M2") + ("+E" if experts else "+F") for kind in c.layers_block_type]
    act = activation_from_hf(c.hidden_act)
    rope = rope_options(c, head_dim, "GraniteMoeHybrid") if c.position_embedding_type == "rope" else {"rope": False}
    mlp = {"moe": dict(d_ff=c.intermediate_size, n_experts=c.num_local_experts, top_k=c.num_experts_per_tok,
                       activation=act, normalize_top_k=True, capacity_factor=None,
                       shared_d_ff=c.shared_intermediate_size)} if experts else \
        {"mlp": dict(d_ff=c.shared_intermediate_size, activation=act, gated=True, bias=False)}
    return ModelConfig(
        layout=layout_text(tokens),
        d_model=c.hidden_size,
        vocab_size=c.vocab_size,
        tie_embeddings=bool(c.tie_word_embeddings),
        norm_eps=c.rms_norm_eps,
        name=getattr(c, "name_or_path", "") or "granitemoehybrid",
        blocks={
            "mamba2": bamba_style_mamba2("GraniteMoeHybrid", c),
            "attention": dict(n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads, head_dim=head_dim,
                              softmax_scale=float(c.attention_multiplier), bias=bool(c.attention_bias), **rope),
            **mlp,
        },
    )


def weight_map(model: HybridLM, hf_config, keys: set[str]) -> WeightMap:
    """HybridLM parameter <-> HF GraniteMoeHybridForCausalLM state-dict entries, multipliers folded in."""
    c = hf_config
    r = c.residual_multiplier
    w = WeightMap()
    embeddings(w, model, norm="model.norm.", embed_scale=c.embedding_multiplier, logits_scale=1 / c.logits_scaling)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        w.params(layer.mixer_norm, p + "input_layernorm.")
        w.params(layer.mlp_norm, p + "post_attention_layernorm.")
        if isinstance(layer.mixer, Attention):
            attention_weights(w, layer.mixer, p + "self_attn.", out_scale=r)
        else:
            mamba2_weights(w, layer.mixer, p + "mamba.", out_scale=r)
        shared = layer.mlp.shared if isinstance(layer.mlp, MoE) else layer.mlp
        w.params(shared.up_proj, p + "shared_mlp.input_linear.")
        w.scaled_params(shared.down_proj, p + "shared_mlp.output_linear.", r)
        if isinstance(layer.mlp, MoE):
            q = p + "block_sparse_moe."
            w.same(layer.mlp.router.weight, q + "router.weight")
            w.same(layer.mlp.up_proj, q + "experts.gate_up_proj")
            w.scaled(layer.mlp.down_proj, q + "experts.down_proj", r)
    return w


def hf_config(model: HybridLM):
    """The HF GraniteMoeHybridConfig of a HybridLM whose layers are (Mamba2 | attention) + (MoE with a shared
    expert | gated MLP)."""
    from transformers import GraniteMoeHybridConfig

    c = model.config
    require(not invocations(model), "HF GraniteMoeHybrid has no shared blocks")
    layers = list(model.layers)
    require(all(isinstance(layer.mixer, (Mamba2, Attention)) for layer in layers)
            and (all(isinstance(layer.mlp, MoE) for layer in layers) or all(isinstance(layer.mlp, MLP)
                                                                            for layer in layers)),
            "HF GraniteMoeHybrid layers are a Mamba2 or attention mixer followed by an MoE in every layer, or by "
            "an MLP in every layer")
    m = same_config([layer.mixer for layer in layers if isinstance(layer.mixer, Mamba2)], "Mamba2")
    a = same_config([layer.mixer for layer in layers if isinstance(layer.mixer, Attention)], "attention")
    f = same_config([layer.mlp for layer in layers], "MLP or MoE")
    require(m is not None, "HF GraniteMoeHybrid needs at least one Mamba2 layer")
    require(m.gate_norm == "gated" and m.d_inner == m.expand * c.d_model and m.norm_eps == c.norm_eps,
            "HF GraniteMoeHybrid's Mamba2 is expand * d_model wide, gates before its norm and uses the model's eps")
    extra = hf_mamba2(m) | {"mamba_expand": m.expand}
    if a is not None:
        require(a.d_input == c.d_model and a.head_dim * a.n_heads == c.d_model and a.v_head_dim == a.head_dim
                and a.window is None and (not a.rope or a.rope_dim == a.head_dim),
                "HF GraniteMoeHybrid's attention has head_dim = d_model // n_heads, values as wide as keys, no "
                "window and RoPE (if any) on whole heads")
        extra.update(num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, attention_bias=a.bias,
                     attention_multiplier=a.softmax_scale or a.head_dim**-0.5,
                     position_embedding_type="rope" if a.rope else None)
        if a.rope:
            extra["rope_parameters"] = {"rope_type": "default", "rope_theta": a.rope_theta}
    if isinstance(layers[0].mlp, MoE):
        require(f.normalize_top_k and f.capacity_factor is None and f.shared_d_ff > 0,
                "HF GraniteMoeHybrid's MoE is dropless, renormalises the top-k weights and has a shared expert")
        extra.update(num_local_experts=f.n_experts, num_experts_per_tok=f.top_k, intermediate_size=f.d_ff,
                     shared_intermediate_size=f.shared_d_ff)
    else:
        require(f.gated and not f.bias, "HF GraniteMoeHybrid's MLP is gated, without bias")
        extra.update(num_local_experts=0, shared_intermediate_size=f.d_ff)
    require(f.activation == "silu", "HF GraniteMoeHybrid's MLP is SiLU (its activation is the Mamba2 conv's)")
    return GraniteMoeHybridConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=len(layers),
        hidden_act=activation_to_hf(f.activation), rms_norm_eps=c.norm_eps, tie_word_embeddings=c.tie_embeddings,
        layer_types=["full_attention" if isinstance(layer.mixer, Attention) else "linear_attention"
                     for layer in layers], **extra,
    )
