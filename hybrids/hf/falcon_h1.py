"""HF transformers' Falcon-H1 (FalconH1ForCausalLM) <-> HybridLM: config translation and weight map.

Every layer runs Mamba2 heads and attention heads side by side on the same normed input and adds their
outputs, unnormalised, to the residual stream, then a pre-norm residual gated MLP: layout "(M2|A)+F" with
blocks.parallel project="branch", norm=False, reduce="sum". The Mamba2 inner width is mamba_d_ssm (blocks.mamba2
d_ssm) and its output gate is mamba_rms_norm / mamba_norm_before_gate (gate_norm "none", "gated", "norm_first").
Attention rotates whole heads (RoPE).

Falcon-H1's µP multipliers are constants right after (or before) a Linear, so they fold into its weights:
embedding_multiplier into the embedding, lm_head_multiplier into the LM head, ssm_in_multiplier and the
per-segment ssm_multipliers ([z, x, B, C, dt] rows) into in_proj, ssm_out_multiplier into out_proj,
attention_in_multiplier into q/k/v, key_multiplier into k_proj, attention_out_multiplier into o_proj, and
mlp_multipliers into the gate and down projections. The logits are HF's; an export has multipliers 1.
"""

from __future__ import annotations

import torch

from blocks.attention import Attention
from blocks.mamba2 import Mamba2
from blocks.mlp import MLP
from blocks.parallel import Parallel
from hybrids.config import ModelConfig
from hybrids.hf.bamba import attention_weights, check_attention, gated_mlp, rope_options
from hybrids.hf.interop import (
    WeightMap,
    activation_from_hf,
    embeddings,
    invocations,
    layout_text,
    require,
)
from hybrids.hf.mamba2 import hf_mamba2, mamba2_options, mamba2_weights
from hybrids.hf.zamba import same_config
from hybrids.model import HybridLM

PARALLEL = {"project": "branch", "norm": False, "reduce": "sum"}


def _d_ssm(c) -> int:
    return c.mamba_d_ssm if c.mamba_d_ssm is not None else int(c.mamba_expand * c.hidden_size)


def config_from_hf(c) -> ModelConfig:
    """The HybridLM config of an HF FalconH1Config."""
    require(bool(c.mamba_proj_bias) == bool(c.projectors_bias),
            "Falcon-H1 with mamba_proj_bias != projectors_bias has no HybridLM equivalent (one Mamba2 bias option)")
    head_dim = c.hidden_size // c.num_attention_heads
    gate = ("norm_first" if c.mamba_norm_before_gate else "gated") if c.mamba_rms_norm else "none"
    return ModelConfig(
        layout=layout_text(["(M2|A)+F"] * c.num_hidden_layers),
        d_model=c.hidden_size,
        vocab_size=c.vocab_size,
        tie_embeddings=bool(c.tie_word_embeddings),
        norm_eps=c.rms_norm_eps,
        name=getattr(c, "name_or_path", "") or "falcon_h1",
        blocks={
            "mamba2": mamba2_options("Falcon-H1", d_model=c.hidden_size, n_heads=c.mamba_n_heads,
                                     headdim=c.mamba_d_head, ngroups=c.mamba_n_groups, d_state=c.mamba_d_state,
                                     d_conv=c.mamba_d_conv, chunk_size=c.mamba_chunk_size,
                                     conv_bias=c.mamba_conv_bias, bias=c.mamba_proj_bias, norm_eps=c.rms_norm_eps,
                                     dt_limit=c.time_step_limit, activation=c.hidden_act, gate_norm=gate),
            "attention": dict(n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads, head_dim=head_dim,
                              softmax_scale=None, bias=bool(c.attention_bias),
                              **rope_options(c, head_dim, "Falcon-H1")),
            "parallel": dict(PARALLEL),
            "mlp": dict(d_ff=c.intermediate_size, activation=activation_from_hf(c.hidden_act), gated=True,
                        bias=bool(c.mlp_bias)),
        },
    )


def _in_proj_scale(c, m: Mamba2) -> torch.Tensor:
    """Per-row multipliers of in_proj's output [z, x, B, C, dt] (HF's mup_vector)."""
    mc = m.config
    sizes = [mc.d_inner, mc.d_inner, mc.ngroups * mc.d_state, mc.ngroups * mc.d_state, mc.n_heads]
    return torch.cat([torch.full((n,), float(s)) for n, s in zip(sizes, c.ssm_multipliers, strict=True)])


def weight_map(model: HybridLM, hf_config, keys: set[str]) -> WeightMap:
    """HybridLM parameter <-> HF FalconH1ForCausalLM state-dict entries, multipliers folded in."""
    c = hf_config
    w = WeightMap()
    embeddings(w, model, embed_scale=c.embedding_multiplier, logits_scale=c.lm_head_multiplier)
    gate_scale, down_scale = c.mlp_multipliers
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        mamba, attn = layer.mixer.branches
        w.params(layer.mixer_norm, p + "input_layernorm.")
        w.params(layer.mlp_norm, p + "pre_ff_layernorm.")
        mamba2_weights(w, mamba, p + "mamba.", rows=_in_proj_scale(c, mamba), in_scale=c.ssm_in_multiplier,
                       out_scale=c.ssm_out_multiplier)
        attention_weights(w, attn, p + "self_attn.", in_scale=c.attention_in_multiplier, k_scale=c.key_multiplier,
                          out_scale=c.attention_out_multiplier)
        gated_mlp(w, layer.mlp, p + "feed_forward.", gate_scale=gate_scale, out_scale=down_scale)
    return w


def hf_config(model: HybridLM):
    """The HF FalconH1Config of a HybridLM whose layers are (M2|A)+F parallel layers summed unnormalised."""
    from transformers import FalconH1Config

    c = model.config
    require(not invocations(model), "HF Falcon-H1 has no shared blocks")
    layers = list(model.layers)
    require(all(isinstance(layer.mixer, Parallel) and isinstance(layer.mlp, MLP)
                and [type(b) for b in layer.mixer.branches] == [Mamba2, Attention] for layer in layers),
            "HF Falcon-H1 layers are a parallel (M2|A) layer followed by an MLP")
    par = same_config([layer.mixer for layer in layers], "parallel")
    require(all(getattr(par, k) == v for k, v in PARALLEL.items()),
            "HF Falcon-H1 adds its branches unnormalised: blocks.parallel project=branch, norm=false, reduce=sum")
    m = same_config([layer.mixer.branches[0] for layer in layers], "Mamba2")
    a = same_config([layer.mixer.branches[1] for layer in layers], "attention")
    f = same_config([layer.mlp for layer in layers], "MLP")
    require(m.norm_eps == c.norm_eps, "HF Falcon-H1's Mamba2 norm uses the model's norm eps")
    check_attention(a, c.d_model, "Falcon-H1", "full")
    require(f.gated and f.activation == "silu",
            "HF Falcon-H1's MLP is gated SiLU (its activation is the Mamba2 conv's)")
    return FalconH1Config(
        vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=len(layers), intermediate_size=f.d_ff,
        hidden_act="silu", mlp_bias=f.bias, rms_norm_eps=c.norm_eps, tie_word_embeddings=c.tie_embeddings,
        num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, attention_bias=a.bias,
        rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta},
        mamba_d_ssm=m.d_inner, mamba_expand=m.expand, mamba_rms_norm=m.gate_norm != "none",
        mamba_norm_before_gate=m.gate_norm == "norm_first", projectors_bias=m.bias, **hf_mamba2(m),
    )
