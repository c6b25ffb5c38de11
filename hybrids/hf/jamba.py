"""HF transformers' Jamba (JambaForCausalLM) <-> HybridLM: config translation and weight map.

Layer i mixes with attention when i % attn_layer_period == attn_layer_offset (else Mamba) and ends with
an MoE when i % expert_layer_period == expert_layer_offset and num_experts > 1 (else a gated MLP): layout
tokens "M+F", "M+E", "A+F", "A+E". Both sub-blocks are pre-norm residual (input_layernorm,
pre_ff_layernorm). The Mamba mixer has RMSNorms on dt, B and C (inner_norms) and a single head, so its
x_proj / dt_proj Linear weights are HybridLM's per-head parameters with a head axis of 1. Attention is
GQA without positional encoding, scaled by head_dim^-0.5. The router keeps the softmax probabilities of
the top-k experts without renormalising them.

Experts: transformers 5 stores them fused, experts.gate_up_proj (E, 2 * d_ff, d) = [gate; up] per expert
and experts.down_proj (E, d, d_ff), as HybridLM's MoE; transformers 4 has a ModuleList of per-expert
gate_proj / up_proj / down_proj Linears, read here as well.
"""

from __future__ import annotations

import math

import torch

from blocks.attention import Attention
from blocks.mamba import Mamba
from blocks.mlp import MLP
from blocks.moe import MoE
from hybrids.config import ModelConfig
from hybrids.hf.interop import (
    WeightMap,
    activation_from_hf,
    embeddings,
    invocations,
    layout_text,
    require,
)
from hybrids.hf.zamba import same_config
from hybrids.model import HybridLM


def config_from_hf(c) -> ModelConfig:
    """The HybridLM config of an HF JambaConfig."""
    # HF Jamba's Mamba uses hidden_act for its conv activation too, and HybridLM's Mamba uses SiLU.
    require(c.hidden_act in ("silu", "swish"), f"Jamba hidden_act must be 'silu', got {c.hidden_act!r}")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    tokens = [("A" if kind == "attention" else "M") + ("+E" if experts > 1 else "+F")
              for kind, experts in zip(c.layers_block_type, c.layers_num_experts, strict=True)]
    act = activation_from_hf(c.hidden_act)
    return ModelConfig(
        layout=layout_text(tokens),
        d_model=c.hidden_size,
        vocab_size=c.vocab_size,
        tie_embeddings=bool(c.tie_word_embeddings),
        norm_eps=c.rms_norm_eps,
        inject="next",
        name=getattr(c, "name_or_path", "") or "jamba",
        blocks={
            "mamba": dict(d_state=c.mamba_d_state, d_conv=c.mamba_d_conv, expand=c.mamba_expand,
                          dt_rank=c.mamba_dt_rank, n_heads=1, inner_norms=True, conv_bias=c.mamba_conv_bias,
                          bias=c.mamba_proj_bias, norm_eps=c.rms_norm_eps),
            "attention": dict(n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads, head_dim=head_dim,
                              rope=False, softmax_scale=None, bias=False),
            "mlp": dict(d_ff=c.intermediate_size, activation=act, gated=True, bias=False),
            "moe": dict(d_ff=c.intermediate_size, n_experts=c.num_experts, top_k=c.num_experts_per_tok,
                        activation=act, normalize_top_k=False, capacity_factor=None),
        },
    )


def _mamba(w: WeightMap, m: Mamba, p: str) -> None:
    w.params(m.in_proj, p + "in_proj.")
    w.params(m.conv1d, p + "conv1d.")
    for ours, theirs in ((m.x_proj, "x_proj.weight"), (m.dt_proj, "dt_proj.weight")):
        w.custom(ours, (p + theirs,), lambda t: t[None], lambda t: (t[0],))  # add / drop the head axis
    w.same(m.dt_bias, p + "dt_proj.bias")
    w.same(m.A_log, p + "A_log")
    w.same(m.D, p + "D")
    w.params(m.out_proj, p + "out_proj.")
    for norm, name in zip(m.inner_norms, ("dt_layernorm", "b_layernorm", "c_layernorm"), strict=True):
        w.params(norm, f"{p}{name}.")


def _moe(w: WeightMap, moe: MoE, p: str, keys: set[str]) -> None:
    w.same(moe.router.weight, p + "router.weight")
    if p + "experts.gate_up_proj" in keys or p + "experts.0.gate_proj.weight" not in keys:
        w.same(moe.up_proj, p + "experts.gate_up_proj")
        w.same(moe.down_proj, p + "experts.down_proj")
        return
    n = moe.config.n_experts
    ups = tuple(f"{p}experts.{e}.{name}.weight" for e in range(n) for name in ("gate_proj", "up_proj"))
    downs = tuple(f"{p}experts.{e}.down_proj.weight" for e in range(n))
    w.custom(moe.up_proj, ups, lambda *ts: torch.stack([torch.cat(ts[2 * e: 2 * e + 2]) for e in range(n)]),
             lambda t: tuple(part for e in range(n) for part in t[e].chunk(2)))
    w.custom(moe.down_proj, downs, lambda *ts: torch.stack(ts), lambda t: tuple(t.unbind(0)))


def weight_map(model: HybridLM, hf_config, keys: set[str]) -> WeightMap:
    """HybridLM parameter <-> HF JambaForCausalLM state-dict entries."""
    w = WeightMap()
    embeddings(w, model)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        w.params(layer.mixer_norm, p + "input_layernorm.")
        w.params(layer.mlp_norm, p + "pre_ff_layernorm.")
        if isinstance(layer.mixer, Attention):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                w.params(getattr(layer.mixer, name), f"{p}self_attn.{name}.")
        else:
            _mamba(w, layer.mixer, p + "mamba.")
        if isinstance(layer.mlp, MoE):
            _moe(w, layer.mlp, p + "feed_forward.", keys)
        else:
            w.fused(layer.mlp.up_proj.weight, (p + "feed_forward.gate_proj.weight", p + "feed_forward.up_proj.weight"))
            w.params(layer.mlp.down_proj, p + "feed_forward.down_proj.")
    return w


def _period(flags: list[bool], what: str) -> tuple[int, int]:
    """(period, offset) with flags[i] == (i % period == offset) for every i; none set -> past the end."""
    n = len(flags)
    for period in range(1, n + 1):
        for offset in range(period):
            if all(flag == (i % period == offset) for i, flag in enumerate(flags)):
                return period, offset
    require(not any(flags), f"HF Jamba places {what} every k-th layer from an offset; the model has them at "
                            f"layers {[i for i, f in enumerate(flags) if f]}")
    return n + 1, n


def hf_config(model: HybridLM):
    """The HF JambaConfig of a HybridLM whose layers are (Mamba | attention) + (MLP | MoE)."""
    from transformers import JambaConfig

    c = model.config
    require(not invocations(model), "HF Jamba has no shared blocks")
    layers = list(model.layers)
    require(all(isinstance(layer.mixer, (Mamba, Attention)) and isinstance(layer.mlp, (MLP, MoE))
                for layer in layers), "HF Jamba layers are a Mamba or attention mixer followed by an MLP or MoE")
    mambas = [layer.mixer for layer in layers if isinstance(layer.mixer, Mamba)]
    attns = [layer.mixer for layer in layers if isinstance(layer.mixer, Attention)]
    mlps = [layer.mlp for layer in layers if isinstance(layer.mlp, MLP)]
    moes = [layer.mlp for layer in layers if isinstance(layer.mlp, MoE)]
    m, a, f, e = (same_config(b, name) for b, name in ((mambas, "Mamba"), (attns, "attention"),
                                                      (mlps, "MLP"), (moes, "MoE")))
    require(m is None or (m.n_heads == 1 and m.inner_norms and m.norm_eps == c.norm_eps),
            "HF Jamba's Mamba has one head and inner norms with the model's norm eps")
    require(a is None or (not a.rope and not a.bias and a.d_input == c.d_model and a.window is None
                          and a.v_head_dim == a.head_dim
                          and math.isclose(a.softmax_scale or a.head_dim**-0.5, a.head_dim**-0.5)),
            "HF Jamba's attention has no RoPE, no bias, no window, values as wide as keys and the head_dim^-0.5 scale")
    require(f is None or (f.gated and not f.bias and f.activation == "silu"), "HF Jamba's MLP is gated SiLU")
    require(e is None or (e.activation == "silu" and not e.normalize_top_k and e.capacity_factor is None
                          and e.n_experts > 1 and not e.shared_d_ff),
            "HF Jamba's MoE is dropless SiLU without top-k renormalisation or a shared expert")
    require(f is None or e is None or f.d_ff == e.d_ff, "HF Jamba has one intermediate_size for MLPs and experts")
    attn_period, attn_offset = _period([isinstance(layer.mixer, Attention) for layer in layers], "attention")
    moe_period, moe_offset = _period([isinstance(layer.mlp, MoE) for layer in layers], "MoE layers")
    extra = {}
    if a is not None:
        extra.update(num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads)
        if a.head_dim != c.d_model // a.n_heads:
            extra["head_dim"] = a.head_dim
    if m is not None:
        extra.update(mamba_d_state=m.d_state, mamba_d_conv=m.d_conv, mamba_expand=m.expand,
                     mamba_dt_rank=m.dt_rank, mamba_conv_bias=m.conv_bias, mamba_proj_bias=m.bias)
    if e is not None:
        extra.update(num_experts=e.n_experts, num_experts_per_tok=e.top_k)
    return JambaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=len(layers),
        intermediate_size=(f or e).d_ff, hidden_act="silu", rms_norm_eps=c.norm_eps,
        attn_layer_period=attn_period, attn_layer_offset=attn_offset,
        expert_layer_period=moe_period, expert_layer_offset=moe_offset,
        tie_word_embeddings=c.tie_embeddings, **extra,
    )
