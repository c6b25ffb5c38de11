"""HF interop for Bamba, Falcon-H1, NemotronH and GraniteMoeHybrid: HybridLM logits equal transformers' on tiny
random models (CPU, fp32 and fp64), exports load back, and what has no equivalent is refused in one line.

Every HF parameter gets noise before comparing (as in test_hf_parity). Multipliers are set away from 1 so that
folding them into the weights is exercised. Nothing is downloaded: configs are built in-process.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never reach the hub

import pytest
import torch

transformers = pytest.importorskip("transformers")

from blocks import ConfigError  # noqa: E402
from hybrids.hf.interop import family_of, from_hf, to_hf  # noqa: E402
from hybrids.model import build  # noqa: E402
from tests.inputs import noisy  # noqa: E402

TOL = 1e-4
TOL64 = 1e-6  # both sides compute their RMSNorms in fp32 (measured 1.5e-7 to 3.4e-7)
VOCAB = 50
FALCON_MULTIPLIERS = dict(embedding_multiplier=2.0, lm_head_multiplier=0.5, mlp_multipliers=[0.7, 1.3],
                          key_multiplier=1.5, attention_in_multiplier=0.8, attention_out_multiplier=1.2,
                          ssm_multipliers=[0.5, 1.5, 0.8, 1.2, 2.0], ssm_in_multiplier=1.1, ssm_out_multiplier=0.9)


def bamba():
    # Attention at layers 1 and 3 (GQA 4 -> 2, RoPE on half of each head), 2 Mamba2 groups, biases everywhere.
    return transformers.BambaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_indices=[1, 3], mamba_n_heads=4, mamba_d_state=8, mamba_chunk_size=8,
        mamba_n_groups=2, attention_bias=True, mlp_bias=True, attn_implementation="eager")


def falcon_h1(rms_norm: bool, before_gate: bool):
    # Mamba2 48 wide (mamba_d_ssm, not expand * hidden) beside GQA attention in both layers; every multiplier set.
    return transformers.FalconH1Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, mamba_d_ssm=48, mamba_n_heads=4, mamba_d_state=8, mamba_chunk_size=8,
        mamba_n_groups=2, mamba_rms_norm=rms_norm, mamba_norm_before_gate=before_gate, projectors_bias=True,
        mamba_proj_bias=True, attention_bias=True, mlp_bias=True, attn_implementation="eager", **FALCON_MULTIPLIERS)


def nemotron_h():
    # Pattern "M-*-M": Mamba2 (dt clamped below at 0.01), squared-ReLU MLPs, attention with head_dim 12.
    return transformers.NemotronHConfig(
        vocab_size=VOCAB, hidden_size=32, layers_block_type=["linear_attention", "mlp", "full_attention", "mlp",
                                                             "linear_attention"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, intermediate_size=40, mamba_num_heads=4,
        mamba_head_dim=16, n_groups=2, ssm_state_size=8, chunk_size=8, time_step_min=0.01,
        attn_implementation="eager")


def granite_moe():
    # MoE top-2 of 4 with a shared MLP, RoPE, score scale 0.3, residual multiplier 0.7.
    return transformers.GraniteMoeHybridConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, layer_types=["mamba", "attention", "mamba"], mamba_n_heads=4, mamba_d_state=8,
        mamba_chunk_size=8, num_local_experts=4, shared_intermediate_size=16, position_embedding_type="rope",
        attention_multiplier=0.3, residual_multiplier=0.7, embedding_multiplier=3.0, logits_scaling=0.25,
        attn_implementation="eager")


def granite_dense_tied():
    # No experts (the shared MLP is the layer's MLP), no RoPE, tied head: embedding multiplier = 1 / logits_scaling.
    return transformers.GraniteMoeHybridConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        layer_types=["attention", "mamba", "mamba"], mamba_n_heads=4, mamba_d_state=8, mamba_chunk_size=8,
        num_local_experts=0, shared_intermediate_size=16, attention_multiplier=0.3, residual_multiplier=0.7,
        tie_word_embeddings=True, embedding_multiplier=2.0, logits_scaling=0.5, attn_implementation="eager")


CASES = {
    "bamba": (bamba, "(M2+F:A+F)x2"),
    "falcon_h1-no-norm": (lambda: falcon_h1(False, True), "2(M2|A)+F"),
    "falcon_h1-gate-then-norm": (lambda: falcon_h1(True, False), "2(M2|A)+F"),
    "falcon_h1-norm-then-gate": (lambda: falcon_h1(True, True), "2(M2|A)+F"),
    "nemotron_h": (nemotron_h, "M2:F:A:F:M2"),
    "granitemoehybrid-moe": (granite_moe, "M2+E:A+E:M2+E"),
    "granitemoehybrid-dense-tied": (granite_dense_tied, "A+F:2M2+F"),
}


def hf_model(case: str):
    return noisy(transformers.AutoModelForCausalLM.from_config(CASES[case][0]()))


def max_diff(hf, model, ids) -> float:
    with torch.no_grad():
        return (hf(ids).logits - model(ids)).abs().max().item()


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 19))


@pytest.mark.parametrize("case", CASES)
def test_logits_match_hf(case, ids, one_thread):
    hf = hf_model(case)
    model = from_hf(hf)
    assert model.config.layout == CASES[case][1]
    with torch.no_grad():
        assert hf(ids).logits.std() > 0.2  # the comparison is not between near-constant outputs
    assert max_diff(hf, model, ids) < TOL


@pytest.mark.parametrize("case", ["bamba", "falcon_h1-norm-then-gate", "nemotron_h", "granitemoehybrid-dense-tied"])
def test_logits_match_hf_float64(case, ids, one_thread):
    hf = hf_model(case).double()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = from_hf(hf)
    finally:
        torch.set_default_dtype(default)
    assert model.embed.weight.dtype == torch.float64
    assert max_diff(hf, model, ids) < TOL64


@pytest.mark.parametrize("case", CASES)
def test_export_computes_the_same_logits(case, ids, one_thread):
    """to_hf(from_hf(hf)) is the same family; with multipliers folded into the weights the exported model has
    multipliers 1 and the same logits; without them it has HF's very weights."""
    hf = hf_model(case)
    model = from_hf(hf)
    back = to_hf(model, hf.config.model_type)
    assert type(back) is type(hf)
    assert max_diff(back, model, ids) < TOL
    if case in ("bamba", "nemotron_h"):
        original, exported = hf.state_dict(), back.state_dict()
        assert set(exported) == set(original)
        assert all(torch.equal(exported[k], original[k]) for k in original)


NATIVE = {
    "bamba": ("(M2+F:A+F)x2", {"blocks.mamba2.headdim": 16, "blocks.mamba2.d_state": 8, "blocks.mlp.activation": "silu",
                               "blocks.attention.n_heads": 4, "blocks.attention.rope": True,
                               "blocks.attention.rope_dim": 4}),
    "falcon_h1": ("2(M2|A)+F", {"blocks.mamba2.headdim": 16, "blocks.mamba2.d_ssm": 48,
                                "blocks.mamba2.gate_norm": "none", "blocks.mlp.activation": "silu",
                                "blocks.attention.n_heads": 4, "blocks.attention.rope": True,
                                "blocks.parallel.project": "branch", "blocks.parallel.norm": False,
                                "blocks.parallel.reduce": "sum"}),
    "nemotron_h": ("M2:F:A:F", {"blocks.mamba2.headdim": 16, "blocks.mlp.activation": "relu2",
                                "blocks.mlp.gated": False, "blocks.attention.n_heads": 4}),
    "granitemoehybrid": ("M2+E:A+E", {"blocks.mamba2.headdim": 16, "blocks.attention.n_heads": 4,
                                      "blocks.moe.n_experts": 4, "blocks.moe.d_ff": 24, "blocks.moe.shared_d_ff": 16,
                                      "blocks.moe.normalize_top_k": True}),
}


@pytest.mark.parametrize("family", NATIVE)
def test_export_native_model(family, ids, one_thread):
    """A HybridLM built from a layout exports to the HF family its blocks call for and loads back unchanged."""
    layout, options = NATIVE[family]
    model = noisy(build(layout, d_model=32, vocab_size=VOCAB, **options))
    assert family_of(model) == family
    hf = to_hf(model)
    assert hf.config.model_type == family
    assert max_diff(hf, model, ids) < TOL
    again = from_hf(hf)
    assert again.config.layout == layout
    with torch.no_grad():
        assert torch.allclose(again(ids), model(ids), rtol=0, atol=1e-6)


def test_falcon_h1_cached_generation_matches_the_full_forward(ids, one_thread):
    """The options Falcon-H1 needs (d_ssm, gate_norm, an unnormalised summed parallel layer) hold in the step form."""
    model = from_hf(hf_model("falcon_h1-no-norm"))
    cache = model.allocate_cache(2, ids.shape[1])
    with torch.no_grad():
        full = model(ids)
        prefill = model(ids[:, :5], cache)
        steps = [model(ids[:, t:t + 1], cache, step=True) for t in range(5, ids.shape[1])]
    assert (torch.cat([prefill, *steps], dim=1) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize(("make", "message"), [
    (lambda: transformers.NemotronHConfig(hybrid_override_pattern="M*E"), "NemotronH MoE layers"),
    (lambda: transformers.NemotronHConfig(layers_block_type=["linear_attention"], num_nextn_predict_layers=1),
     "multi-token prediction"),
    (lambda: transformers.FalconH1Config(projectors_bias=True), "mamba_proj_bias != projectors_bias"),
    (lambda: transformers.BambaConfig(hidden_act="gelu"), "Bamba's Mamba2 conv activation must be 'silu'"),
    (lambda: transformers.GraniteMoeHybridConfig(rope_parameters={"rope_type": "linear", "factor": 2.0},
                                                 position_embedding_type="rope"), "RoPE type 'linear'"),
])
def test_import_refuses_what_has_no_equivalent(make, message):
    from hybrids.hf.interop import config_from_hf

    with pytest.raises(ConfigError, match=message):
        config_from_hf(make())


def test_tied_head_needs_matching_multipliers():
    config = granite_dense_tied()
    config.logits_scaling = 4.0
    with pytest.raises(ConfigError, match=r"tied embeddings with an embedding multiplier \(2.0\)"):
        from_hf(noisy(transformers.AutoModelForCausalLM.from_config(config)))


@pytest.mark.parametrize(("layout", "options", "family", "message"), [
    ("M2+F:A+F", {"blocks.attention.rope": True}, "bamba", "rotates half of each head"),
    ("M2+F:A+F", {"blocks.mamba2.gate_norm": "none"}, "bamba", "gates before its norm"),
    ("2(M2|A)+F", {"blocks.parallel.project": "branch"}, "falcon_h1", "project=branch, norm=false, reduce=sum"),
    ("M2:E", {}, "nemotron_h", "one block each"),
    ("3M2", {}, None, "NemotronH needs at least one attention layer"),
    ("M2+E:A+E", {}, "granitemoehybrid", "has a shared expert"),
    ("M2+E:A+F", {}, "granitemoehybrid", "an MoE in every layer"),
])
def test_export_rejects_what_hf_cannot_express(layout, options, family, message):
    model = build(layout, d_model=32, vocab_size=VOCAB, **{"blocks.mamba2.headdim": 16,
                                                           "blocks.attention.n_heads": 4, **options})
    with pytest.raises(ConfigError, match=message):
        to_hf(model, family)


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("make", [transformers.BambaConfig, transformers.FalconH1Config,
                                  transformers.GraniteMoeHybridConfig,
                                  lambda: transformers.NemotronHConfig(hybrid_override_pattern="M-M*-M-")])
def test_default_configs_translate_with_hf_parameter_counts(make):
    """transformers' default (full-size) configs: the translated HybridLM has HF's parameter count (meta device)."""
    from hybrids.hf.interop import config_from_hf

    config = config_from_hf(make())
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(make())
    assert count(build(config, device="meta")) == count(hf) > 10**8


def test_info_prints_the_translated_layout(tmp_path, capsys):
    """`hybrids info` on an HF model directory (config.json only) and on a family's default config."""
    from hybrids.cli import main

    nemotron_h().save_pretrained(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    assert main(["info", "hf:falcon_h1"]) == 0
    assert main(["info", "hf:llama"]) == 2
    out, err = capsys.readouterr()
    assert f"{tmp_path}: M2:F:A:F:M2\n" in out and "falcon_h1: 32(M2|A)+F\n" in out
    assert err.strip().startswith("hybrids: error: HF model type 'llama' is not supported; supported: zamba,")
