"""HF transformers' NemotronH (NemotronHForCausalLM) <-> HybridLM: config translation and weight map.

NemotronH's layers each hold one block behind a pre-norm residual: Mamba2 ("M" in its hybrid_override_pattern),
attention ("*", no positional encoding), a plain MLP ("-", squared ReLU) or an MoE ("E"). They translate one to
one into layout layers "M2", "A" and a lone "F" (layout "M2:F:A:F" for the pattern "M-*-"). NemotronH's MoE
(sigmoid router with group-limited routing, non-gated experts, a shared expert) and its multi-token prediction
layers have no HybridLM equivalent and are refused. The Mamba2 mixer clamps dt from below at time_step_min.
"""

from __future__ import annotations

import math

from blocks.attention import Attention
from blocks.mamba2 import Mamba2
from blocks.mlp import MLP
from hybrids.config import ModelConfig
from hybrids.hf.bamba import attention_weights
from hybrids.hf.interop import (
    WeightMap,
    activation_from_hf,
    activation_to_hf,
    embeddings,
    invocations,
    layout_text,
    require,
)
from hybrids.hf.mamba2 import mamba2_options, mamba2_weights
from hybrids.hf.zamba import same_config
from hybrids.hf.zamba2 import NO_CLAMP
from hybrids.model import HybridLM

TOKENS = {"linear_attention": "M2", "full_attention": "A", "mlp": "F"}


def config_from_hf(c) -> ModelConfig:
    """The HybridLM config of an HF NemotronHConfig."""
    types = list(c.layers_block_type)
    require("moe" not in types, "NemotronH MoE layers ('E' in the pattern: sigmoid router, group-limited routing, "
                                "non-gated experts) have no HybridLM equivalent")
    require(not c.num_nextn_predict_layers, "NemotronH multi-token prediction layers have no HybridLM equivalent")
    return ModelConfig(
        layout=layout_text([TOKENS[t] for t in types]),
        d_model=c.hidden_size,
        vocab_size=c.vocab_size,
        tie_embeddings=bool(c.tie_word_embeddings),
        norm_eps=c.layer_norm_epsilon,
        name=getattr(c, "name_or_path", "") or "nemotron_h",
        blocks={
            "mamba2": mamba2_options("NemotronH", d_model=c.hidden_size, n_heads=c.mamba_num_heads,
                                     headdim=c.mamba_head_dim, ngroups=c.n_groups, d_state=c.ssm_state_size,
                                     d_conv=c.conv_kernel, chunk_size=c.chunk_size, conv_bias=c.use_conv_bias,
                                     bias=c.use_bias, norm_eps=c.layer_norm_epsilon,
                                     dt_limit=(c.time_step_min, math.inf), activation=c.mamba_hidden_act),
            "attention": dict(n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
                              rope=False, softmax_scale=None, bias=False),
            "mlp": dict(d_ff=c.intermediate_size, activation=activation_from_hf(c.mlp_hidden_act), gated=False,
                        bias=bool(c.mlp_bias)),
        },
    )


def weight_map(model: HybridLM, hf_config, keys: set[str]) -> WeightMap:
    """HybridLM parameter <-> HF NemotronHForCausalLM state-dict entries."""
    w = WeightMap()
    embeddings(w, model, embed="model.embeddings.weight", norm="model.norm_f.")
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        if isinstance(layer.mixer, Attention):
            w.params(layer.mixer_norm, p + "norm.")
            attention_weights(w, layer.mixer, p + "mixer.")
        elif layer.mixer is not None:
            w.params(layer.mixer_norm, p + "norm.")
            mamba2_weights(w, layer.mixer, p + "mixer.")
        else:
            w.params(layer.mlp_norm, p + "norm.")
            w.params(layer.mlp.up_proj, p + "mixer.up_proj.")
            w.params(layer.mlp.down_proj, p + "mixer.down_proj.")
    return w


def hf_config(model: HybridLM):
    """The HF NemotronHConfig of a HybridLM whose layers are each one Mamba2, attention or MLP block."""
    from transformers import NemotronHConfig

    c = model.config
    require(not invocations(model), "HF NemotronH has no shared blocks")
    layers = list(model.layers)
    kinds = [type(layer.mixer if layer.mixer is not None else layer.mlp) for layer in layers]
    require(all((layer.mixer is None) != (layer.mlp is None) for layer in layers)
            and set(kinds) <= {Mamba2, Attention, MLP},
            "HF NemotronH layers are one block each: a Mamba2 or attention mixer, or an MLP alone")
    require(Attention in kinds, "HF NemotronH needs at least one attention layer (its generation cache does); "
                                "a layout without one has no NemotronH equivalent")
    m = same_config([layer.mixer for layer in layers if isinstance(layer.mixer, Mamba2)], "Mamba2")
    a = same_config([layer.mixer for layer in layers if isinstance(layer.mixer, Attention)], "attention")
    f = same_config([layer.mlp for layer in layers if layer.mlp is not None], "MLP")
    extra = {}
    if m is not None:
        require(m.gate_norm == "gated" and m.norm_eps == c.norm_eps and m.dt_limit[1] == math.inf
                and m.conv_bias, "HF NemotronH's Mamba2 gates before its norm (model norm eps), has a conv bias "
                                 "and clamps dt only from below")
        extra.update(mamba_num_heads=m.n_heads, mamba_head_dim=m.headdim, n_groups=m.ngroups,
                     ssm_state_size=m.d_state, conv_kernel=m.d_conv, chunk_size=m.chunk_size, use_bias=m.bias,
                     time_step_min=m.dt_limit[0] or NO_CLAMP, expand=m.expand)
    if a is not None:
        require(not a.rope and not a.bias and a.d_input == c.d_model and a.window is None
                and a.v_head_dim == a.head_dim
                and math.isclose(a.softmax_scale or a.head_dim**-0.5, a.head_dim**-0.5),
                "HF NemotronH's attention has no RoPE, no bias, no window, values as wide as keys and the "
                "head_dim^-0.5 scale")
        extra.update(num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, head_dim=a.head_dim)
    if f is not None:
        require(not f.gated, "HF NemotronH's MLP is not gated")
        extra.update(intermediate_size=f.d_ff, mlp_hidden_act=activation_to_hf(f.activation), mlp_bias=f.bias)
    names = {Mamba2: "linear_attention", Attention: "full_attention", MLP: "mlp"}
    return NemotronHConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, layers_block_type=[names[k] for k in kinds],
        layer_norm_epsilon=c.norm_eps, tie_word_embeddings=c.tie_embeddings, **extra,
    )
