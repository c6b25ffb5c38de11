import pytest
import torch

from blocks import ConfigError
from blocks.shared import SharedAttention
from hybrids.config import ModelConfig, load_config, recipe_names
from hybrids.layout import LayoutError
from hybrids.model import HybridLM, build, sample
from tests.inputs import max_rel

PUBLISHED = {"zamba-7b": 7_232_490_496, "zamba2-2.7b": 2_662_214_560, "zamba2-1.2b": 1_215_064_704,
             "jamba": 51_570_323_328}
SMALL = {"blocks": {"attention": {"n_heads": 4},
                    "shared_attention": {"n_heads": 4, "lora_rank": 4, "attn_lora_rank": 2},
                    "mamba2": {"headdim": 16, "d_state": 8}, "moe": {"n_experts": 4, "d_ff": 16}}}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_reference_recipes_have_the_published_parameter_counts(name):
    assert n_params(build(name, device="meta")) == PUBLISHED[name]


def test_llama_baseline_is_the_187m_reference():
    assert round(n_params(build("llama", device="meta")) / 1e6) == 187


@pytest.mark.parametrize("name", recipe_names())
def test_every_shipped_recipe_validates_and_builds_on_meta(name):
    config = load_config(name)
    assert config.name == name
    model = build(name, device="meta")
    assert model.embed.weight.is_meta and model.layout.n_layers > 0


def test_zamba_7b_layout_matches_hf_hybrid_positions():
    model = build("zamba-7b", device="meta")
    assert model.layout.invocation_layers == (2, 7, *range(13, 74, 6))
    assert len(model.shared) == 1 and model.shared["A_0"].config.n_invocations == 13
    assert model.lm_head.weight is model.embed.weight


def test_round_robin_shared_blocks_are_distinct_weight_sets_used_in_turn():
    model = build("zamba2-2.7b", device="meta")
    a, b = model.shared["A_0"], model.shared["A_1"]
    assert a.attn.q_proj.weight is not b.attn.q_proj.weight
    assert (a.config.n_invocations, b.config.n_invocations) == (5, 4)
    shared_entries = [p for p in model.plan if p[0] == "shared"]
    assert [p[1] for p in shared_entries[:4]] == ["A_0", "A_1", "A_0", "A_1"]
    assert [p[2] for p in shared_entries[:4]] == [0, 0, 1, 1]


def test_shared_weights_are_one_parameter_touched_by_every_invocation():
    model = build("(2M:A*)x3", d_model=16, vocab_size=32, **SMALL)
    shared = model.shared["A_0"]
    assert isinstance(shared, SharedAttention) and shared.config.n_invocations == 3
    q = shared.attn.q_proj.weight
    assert sum(p is q for p in model.parameters()) == 1
    calls = []
    handle = shared.attn.q_proj.register_forward_hook(lambda m, i, o: calls.append(m.weight))
    model(torch.randint(0, 32, (1, 5)))
    handle.remove()
    assert len(calls) == 3 and all(w is q for w in calls)


@pytest.mark.parametrize("layout", ["(2M:A*)x2:M", "(M+F:M+E:A+F)x2", "(2M2:A*2)x2", "3A+F", "2M:M*:M:M*", "M:2A*:M"])
@pytest.mark.parametrize("inject", ["next", "residual"])
def test_cached_step_by_step_logits_equal_full_forward(layout, inject):
    model = build(layout, d_model=16, vocab_size=32, inject=inject, **SMALL).double()
    ids = torch.randint(0, 32, (2, 13))
    full = model(ids)
    cache = model.allocate_cache(2, 13)
    outs = [model(ids[:, :6], cache)] + [model(ids[:, t : t + 1], cache, step=True) for t in range(6, 13)]
    assert cache.position == 13
    assert max_rel(torch.cat(outs, 1), full) < 1e-10


def test_inject_next_differs_from_residual_and_concat_changes_width():
    ids = torch.randint(0, 32, (1, 7))
    torch.manual_seed(1)
    a = build("2M:A*:2M", d_model=16, vocab_size=32, **SMALL)
    torch.manual_seed(1)
    b = build("2M:A*:2M", d_model=16, vocab_size=32, inject="residual", **SMALL)
    assert not torch.allclose(a(ids), b(ids))
    c = build("2M:A*:2M", d_model=16, vocab_size=32, **{"blocks.shared_attention.concat_embeddings": False})
    assert c.shared["A_0"].attn.q_proj.weight.shape == (16, 16)


def test_greedy_generation_equals_argmax_of_full_forward():
    model = build("zamba-tiny").eval()
    prompt = torch.randint(0, 256, (2, 5))
    out = model.generate(prompt, max_new_tokens=6)
    seq = prompt
    for _ in range(6):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_sampling_is_reproducible_and_respects_top_k():
    model = build("zamba2-tiny").eval()
    prompt = torch.randint(0, 256, (1, 4))
    runs = [model.generate(prompt, 8, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1]) and runs[0].shape == (1, 12)
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0]])
    picks = {sample(logits, 1.0, top_k=2, generator=torch.Generator().manual_seed(s)).item() for s in range(50)}
    assert picks == {1, 3}
    assert {sample(logits, 1.0, top_p=0.5, generator=torch.Generator().manual_seed(s)).item() for s in range(20)} == {1}


def test_generation_stops_at_eos():
    model = build("mamba-tiny").eval()
    prompt = torch.randint(0, 256, (1, 3))
    first = model.generate(prompt, 1)[0, -1].item()
    assert model.generate(prompt, 10, eos_token_id=first).shape == (1, 4)


def test_moe_aux_loss_reaches_the_model():
    model = build("jamba-tiny")
    model(torch.randint(0, 256, (2, 9)))
    aux = model.aux_loss()
    moe_losses = [layer.mlp.aux_loss() for layer in model.layers if type(layer.mlp).__name__ == "MoE"]
    assert len(moe_losses) == 4 and aux.item() == pytest.approx(sum(x.item() for x in moe_losses))
    assert aux.requires_grad
    assert build("mamba-tiny").aux_loss() is None


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"d_modle": 64}, ConfigError, "unknown model config key\\(s\\) d_modle; valid: .*d_model"),
        ({"inject": "sideways"}, ConfigError, "inject must be one of next, residual"),
        ({"blocks.mamba.d_sate": 4}, ConfigError, "unknown key\\(s\\) d_sate for block 'mamba'"),
        ({"layout": "6M:A%"}, LayoutError, "expected"),
    ],
)
def test_bad_configs_fail_with_one_clear_message(kwargs, error, message):
    with pytest.raises(error, match=message):
        build("zamba-tiny", **kwargs)


def test_config_precedence_defaults_recipe_overrides():
    config = load_config("zamba-tiny", d_model=96, **{"blocks.mamba.d_state": 8})
    assert config.d_model == 96 and config.blocks["mamba"] == {"d_state": 8, "n_heads": 2}
    assert config.norm_eps == ModelConfig(layout="M").norm_eps
    assert isinstance(HybridLM(load_config("6M:A*", d_model=16, vocab_size=8)), HybridLM)


def test_the_model_traces_as_one_graph_and_backend_choice_breaks_none():
    """torch.compile(fullgraph=True) fails at any graph break: the ops' backend choice (which imports the kernels'
    packages on first use) must be a constant while tracing, also for CUDA devices."""
    from blocks.ops import backend

    model = build("(M2:M:A*)x2", d_model=32, vocab_size=64, **{"blocks.mamba2.headdim": 8})
    ids = torch.randint(0, 64, (2, 16))
    traced = torch.compile(model, fullgraph=True, backend="eager")
    assert torch.allclose(traced(ids), model(ids), atol=1e-6)

    def pick(x):
        return x + 1 if backend.resolve("auto", torch.device("cuda")) in ("torch", "mamba_ssm") else x

    assert torch.equal(torch.compile(pick, fullgraph=True, backend="eager")(torch.zeros(2)), torch.ones(2))
