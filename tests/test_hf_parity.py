"""HF interop: HybridLM logits equal transformers' Zamba, Zamba2 and Jamba on tiny random models (CPU, fp32).

Every HF parameter gets noise before comparing, so that weights HF initialises to zero or one (LoRA
up-projections, norms, D) take part. Nothing is downloaded: configs are built in-process.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never reach the hub

import pytest
import torch

transformers = pytest.importorskip("transformers")

from blocks import ConfigError  # noqa: E402
from hybrids.config import load_config  # noqa: E402
from hybrids.hf.interop import config_from_hf, from_hf, layout_text, load_weights, to_hf  # noqa: E402
from hybrids.hf.jamba import weight_map as jamba_weight_map  # noqa: E402
from hybrids.hf.zamba import star_layout  # noqa: E402
from hybrids.hf.zamba import weight_map as zamba_weight_map  # noqa: E402
from hybrids.layout import Layer, parse_layout  # noqa: E402
from hybrids.model import HybridLM, build  # noqa: E402
from tests.inputs import noisy  # noqa: E402

TOL = 1e-4
VOCAB = 50


def zamba():
    # Hybrid layers 2, 4 and 7 of 8 (HF's rule: 2, then i % 3 == 1 after the first three); GQA 6 -> 2.
    return transformers.ZambaConfig(
        vocab_size=VOCAB, hidden_size=36, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2,
        intermediate_size=40, n_mamba_heads=2, mamba_dt_rank=5, mamba_d_state=4, attn_layer_period=3,
        attn_layer_offset=1, mamba_proj_bias=True, attn_implementation="eager")


def zamba2_two_blocks():
    # Blocks A, B, A over hybrid layers 1, 3, 4; LoRA on the MLP and on q/k/v; RoPE; 2 Mamba2 groups.
    return transformers.Zamba2Config(
        vocab_size=VOCAB, hidden_size=36, num_hidden_layers=6, num_attention_heads=4, intermediate_size=40,
        n_mamba_heads=4, mamba_ngroups=2, mamba_d_state=8, chunk_size=8, num_mem_blocks=2,
        use_shared_attention_adapter=True, adapter_rank=4, use_mem_rope=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "hybrid", "mamba"], attn_implementation="eager")


def zamba2_one_block():
    # One block, no attention adapters (HF always has MLP adapters), no RoPE, GQA 6 -> 3.
    return transformers.Zamba2Config(
        vocab_size=VOCAB, hidden_size=36, num_hidden_layers=5, num_attention_heads=6, num_key_value_heads=3,
        intermediate_size=44, n_mamba_heads=2, mamba_d_state=6, chunk_size=4, adapter_rank=3,
        layers_block_type=["hybrid", "mamba", "mamba", "hybrid", "mamba"], attn_implementation="sdpa")


def jamba():
    # Attention at layers 1 and 4 (GQA 4 -> 2, head_dim 11), MoE top-2 of 4 at odd layers, width 44.
    return transformers.JambaConfig(
        vocab_size=VOCAB, hidden_size=44, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=56, num_experts=4, num_experts_per_tok=2, attn_layer_period=3, attn_layer_offset=1,
        mamba_d_state=6, attn_implementation="eager")


CASES = {
    "zamba": (zamba, "(2M:A*)x2:3M:A*:M"),
    "zamba2-two-blocks-lora-rope": (zamba2_two_blocks, "M2:A*2:2M2:A*2:M2:A*2:2M2"),
    "zamba2-one-block": (zamba2_one_block, "A*:3M2:A*:2M2"),
    "jamba": (jamba, "M+F:A+E:M+F:M+E:A+F:M+E"),
}


def hf_model(case: str):
    config = CASES[case][0]()
    return noisy(transformers.AutoModelForCausalLM.from_config(config))


def max_diff(hf, model, ids) -> float:
    with torch.no_grad():
        return (hf(ids).logits - model(ids)).abs().max().item()


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 19))


@pytest.mark.parametrize("case", CASES)
def test_logits_match_hf(case, ids):
    hf = hf_model(case)
    model = from_hf(hf)
    assert model.config.layout == CASES[case][1]
    with torch.no_grad():
        logits = hf(ids).logits
    assert logits.std() > 0.3  # the comparison is not between near-constant outputs
    assert max_diff(hf, model, ids) < TOL


def test_zamba2_adapters_follow_hybrid_order():
    """Invocation j of weight set s is hybrid layer j * 2 + s and reads that slot of block s."""
    hf = hf_model("zamba2-two-blocks-lora-rope")
    model = from_hf(hf)
    assert set(model.shared) == {"A_0", "A_1"}
    assert [model.shared[k].config.n_invocations for k in ("A_0", "A_1")] == [2, 1]
    block = "model.layers.1.shared_transformer."  # hybrid layers 1 and 4 use block A; 3 uses block B
    second = hf.state_dict()[block + "self_attn.linear_v_adapter_list.2.1.weight"]
    assert torch.equal(model.shared["A_0"].invocations[1].qkv_lora[2][1].weight, second)
    assert torch.equal(model.shared["A_0"].invocations[1].out_proj.weight, hf.model.layers[4].linear.weight)
    assert torch.equal(model.shared["A_1"].invocations[0].mlp_lora[0].weight,
                       hf.model.layers[3].shared_transformer.feed_forward.gate_up_proj_adapter_list[1][0].weight)


@pytest.mark.parametrize("case", CASES)
def test_round_trip_reproduces_hf_weights(case):
    hf = hf_model(case)
    back = to_hf(from_hf(hf))
    assert type(back) is type(hf)
    original, exported = hf.state_dict(), back.state_dict()
    assert set(exported) == set(original)
    assert all(torch.equal(exported[k], original[k]) for k in original)


NATIVE = {
    "zamba": ("A*:(2M:A*)x2:M", {"tie_embeddings": False, "blocks.mamba.n_heads": 2,
                                 "blocks.shared_attention.n_heads": 4}),
    "zamba2": ("M2:A*3:(2M2:A*3)x3:M2", {"blocks.mamba2.headdim": 16, "blocks.mamba2.d_state": 8,
                                         "blocks.shared_attention.n_heads": 4,
                                         "blocks.shared_attention.attn_lora_rank": 3,
                                         "blocks.shared_attention.rope": True}),
    "jamba": ("(M+F:A+E)x2", {"norm_eps": 1e-6, "blocks.mamba.inner_norms": True, "blocks.moe.n_experts": 4,
                              "blocks.moe.d_ff": 48, "blocks.mlp.d_ff": 48, "blocks.mlp.activation": "silu",
                              "blocks.attention.n_heads": 4, "blocks.attention.n_kv_heads": 2}),
}


@pytest.mark.parametrize("family", NATIVE)
def test_export_native_model(family, ids):
    """A HybridLM built from a layout exports to the HF family of its blocks and loads back unchanged."""
    layout, options = NATIVE[family]
    model = noisy(build(layout, d_model=32, vocab_size=VOCAB, **options))
    hf = to_hf(model)
    assert hf.config.model_type == family
    assert max_diff(hf, model, ids) < TOL
    again = from_hf(hf)
    assert again.config.layout == layout
    with torch.no_grad():
        assert torch.allclose(again(ids), model(ids), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("layout", "options", "message"), [
    ("2M:A*:M:A*", {}, "none after the last layer"),
    ("2M:A*:M", {}, "exactly one hybrid layer"),
    ("4M", {}, "at least one shared invocation"),
    ("M:2A*:M", {}, "at most one shared invocation"),
    ("M2:A*x:M2:A*y:M2:A*y", {}, "round-robin"),
    ("M+F:A+F", {}, "Jamba's Mamba has one head and inner norms"),
    ("M:A+F", {}, "a Mamba or attention mixer followed by an MLP"),
    ("M:A*:M:A*:M", {"blocks.shared_attention.rope": True}, "no LoRA and no RoPE"),
])
def test_export_rejects_what_hf_cannot_express(layout, options, message):
    model = build(layout, d_model=32, vocab_size=VOCAB, **{"blocks.shared_attention.n_heads": 2, **options})
    with pytest.raises(ConfigError, match=message):
        to_hf(model)


@pytest.mark.parametrize("case", ["zamba", "zamba2-two-blocks-lora-rope", "jamba"])
def test_from_saved_directory(case, tmp_path, ids):
    hf = hf_model(case)
    hf.save_pretrained(tmp_path)
    assert max_diff(hf, from_hf(tmp_path), ids) < TOL
    assert max_diff(hf, from_hf(str(tmp_path), backend="torch"), ids) < TOL


def test_remote_names_and_bad_paths_raise(tmp_path):
    with pytest.raises(ConfigError, match="must be downloaded first"):
        from_hf(tmp_path / "missing")
    with pytest.raises(ConfigError, match="allow_remote=True"):
        from_hf("Zyphra/Zamba2-1.2B")
    with pytest.raises(ConfigError, match="no config.json"):
        from_hf(tmp_path)
    with pytest.raises(ConfigError, match="not supported"):
        config_from_hf(transformers.LlamaConfig())
    with pytest.raises(ConfigError, match="not a model without an LM head"):
        from_hf(hf_model("zamba").model)


def test_untied_hf_shared_blocks(ids):
    """transformers ties the shared blocks only when tie_word_embeddings is set: an untied HF Zamba2 has
    one copy per hybrid layer. Copies that differ have no HybridLM equivalent; equal ones (as saved
    checkpoints hold) load."""
    config = zamba2_one_block()
    config.tie_word_embeddings = False
    hf = noisy(transformers.AutoModelForCausalLM.from_config(config))
    with pytest.raises(ConfigError, match="should be tied"):
        from_hf(hf)
    with torch.no_grad():
        for mine, first in zip(hf.model.layers[3].shared_transformer.parameters(),
                               hf.model.layers[0].shared_transformer.parameters(), strict=True):
            mine.copy_(first)
    model = from_hf(hf)
    assert not model.config.tie_embeddings
    assert max_diff(hf, model, ids) < TOL


def test_weights_must_map_one_to_one():
    hf = hf_model("zamba")
    with pytest.raises(ConfigError, match=r"no HF weights for 6 HybridLM parameter\(s\): shared.A_0.invocations"):
        from_hf(hf, **{"blocks.shared_attention.lora_rank": 2})  # 3 invocations x 2 LoRA matrices
    model = HybridLM(config_from_hf(hf.config))
    weights = zamba_weight_map(model, hf.config, set(hf.state_dict()))
    with torch.no_grad():
        state = hf.state_dict()
        state["model.layers.0.mamba.extra"] = torch.zeros(3)
        with pytest.raises(ConfigError, match="no place in the HybridLM"):
            load_weights(model, weights, state)
        state = hf.state_dict()
        del state["model.layers.3.mamba.A_log"]
        with pytest.raises(ConfigError, match="has no model.layers.3.mamba.A_log"):
            load_weights(model, weights, state)
        state = hf.state_dict()
        key = "model.layers.4.shared_transf.self_attn.q_proj.weight"  # a tied copy of layer 2's
        state[key] = state[key] + 1
        with pytest.raises(ConfigError, match="should be tied"):
            load_weights(model, weights, state)


def test_jamba_per_expert_checkpoints(ids):
    """transformers 4 keeps a ModuleList of experts: the same weights under per-expert names load alike."""
    hf = hf_model("jamba")
    state = {}
    for key, value in hf.state_dict().items():
        prefix, _, name = key.rpartition("experts.")
        if name == "gate_up_proj":
            for e in range(value.shape[0]):
                gate, up = value[e].chunk(2)
                state[f"{prefix}experts.{e}.gate_proj.weight"], state[f"{prefix}experts.{e}.up_proj.weight"] = gate, up
        elif name == "down_proj":
            for e in range(value.shape[0]):
                state[f"{prefix}experts.{e}.down_proj.weight"] = value[e]
        else:
            state[key] = value
    model = HybridLM(config_from_hf(hf.config))
    with torch.no_grad():
        load_weights(model, jamba_weight_map(model, hf.config, set(state)), state)
    assert max_diff(hf, model, ids) < TOL


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


RELEASED = {  # DESIGN.md's parameter counts of the released models
    "zamba-7b": (lambda: transformers.ZambaConfig(), 7_232_490_496),
    "zamba2-2.7b": (lambda: transformers.Zamba2Config(
        n_mamba_heads=80, intermediate_size=10240, num_mem_blocks=2, adapter_rank=128), 2_662_214_560),
    "zamba2-1.2b": (lambda: transformers.Zamba2Config(
        hidden_size=2048, num_hidden_layers=38, mamba_d_state=128, n_mamba_heads=64, intermediate_size=8192,
        layers_block_type=(["mamba"] * 5 + ["hybrid"]) * 6 + ["mamba"] * 2, use_shared_attention_adapter=True,
        use_mem_rope=True, adapter_rank=128), 1_215_064_704),
    "jamba": (lambda: transformers.JambaConfig(), 51_570_323_328),
}


@pytest.mark.parametrize("name", RELEASED)
def test_released_configs_translate(name):
    make, expected = RELEASED[name]
    config = config_from_hf(make())
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(make())
    assert count(build(config, device="meta")) == count(hf) == expected


def test_zamba_7b_layout_is_the_recipes():
    config, recipe = config_from_hf(transformers.ZambaConfig()), load_config("zamba-7b")
    assert config.layout == recipe.layout == "2M:A*:5M:A*:(6M:A*)x11:3M"
    assert config.blocks["mamba"] == recipe.blocks["mamba"] | {"dt_min": 1e-3, "dt_max": 0.1, "dt_init_floor": 1e-4}
    assert {k: config.blocks["shared_attention"][k] for k in recipe.blocks["shared_attention"]} == \
        recipe.blocks["shared_attention"]


def test_layout_text_expands_to_its_tokens():
    generator = torch.Generator().manual_seed(1)
    vocabulary = ["M", "M+F", "A*"]
    for _ in range(200):
        n = int(torch.randint(1, 30, (1,), generator=generator))
        tokens = [vocabulary[i] for i in torch.randint(0, 3, (n,), generator=generator).tolist()]
        if "A*" in tokens and len(set(tokens)) == 1:
            continue  # a layout needs a backbone layer
        items = parse_layout(layout_text(tokens)).items
        assert [str(item) if isinstance(item, Layer) else "A*" for item in items] == tokens


def test_layout_text():
    assert star_layout(["mamba", "mamba", "hybrid", "mamba"], "M", "A*") == "2M:A*:2M"
    assert star_layout(["hybrid", "linear_attention"], "M2", "A*2") == "A*2:2M2"
    assert layout_text(["M+F", "M+E"] * 3 + ["A+F"]) == "(M+F:M+E)x3:A+F"
    assert layout_text(["M", "A*"] * 2 + ["M"]) == "(M:A*)x2:M"
