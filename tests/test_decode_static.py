"""The fixed-shape decoding step (hybrids.decode) against the full forward and today's dynamic step, on CPU."""

import pytest
import torch

from blocks import ConfigError
from hybrids.decode import StaticDecoder, make_decoder, not_static, state_tensors
from hybrids.model import build
from tests.inputs import max_rel
from tests.test_model import SMALL

STATIC_LAYOUTS = ["(2M:A*)x2:M", "(2M2:A*2)x2", "3A+F", "2M:M*:M:M*", "M:2A*:M", "(A|M2)+F:G"]
PARALLEL = {"blocks.parallel.project": "branch"}  # the parallel layer's branches differ in width at d_model 16
GQA_ROPE = {"blocks.attention.n_kv_heads": 2, "blocks.attention.rope": True, "blocks.shared_attention.rope": True}
PARTIAL_ROPE = {"blocks.attention.rope": True, "blocks.attention.rope_dim": 2}  # of head_dim 4


@pytest.mark.parametrize("layout", STATIC_LAYOUTS)
@pytest.mark.parametrize("options", [{}, GQA_ROPE, PARTIAL_ROPE], ids=["plain", "gqa-rope", "partial-rope"])
def test_static_step_logits_equal_full_forward(layout, options, one_thread):
    model = build(layout, d_model=16, vocab_size=32, **{**SMALL, **PARALLEL, **options}).double()
    ids = torch.randint(0, 32, (2, 13))
    full = model(ids)
    decoder = StaticDecoder(model, 2, 16)  # 3 slots more than used: masked, never read
    outs = [model(ids[:, :6], decoder.cache)]
    decoder.position.fill_(6)
    outs += [decoder.step(ids[:, t])[:, None] for t in range(6, 13)]
    assert decoder.position.item() == 13
    assert max_rel(torch.cat(outs, 1), full) < 1e-10


@pytest.mark.parametrize("recipe", ["zamba2-tiny", "llama-tiny", "zamba-tiny", "mamba-tiny"])
def test_static_decoding_gives_the_tokens_of_dynamic_decoding(recipe, one_thread):
    model = build(recipe).eval()
    prompt = torch.randint(0, 256, (2, 5))
    dynamic = model.generate(prompt, max_new_tokens=8, decoding="dynamic")
    static = model.generate(prompt, max_new_tokens=8, decoding="static")
    assert torch.equal(static, dynamic) and static.shape == (2, 13)
    sampled = [model.generate(prompt, 8, temperature=1.0, top_k=5, decoding=d,
                              generator=torch.Generator().manual_seed(3)) for d in ("dynamic", "static")]
    assert torch.equal(sampled[0], sampled[1])


def test_static_decoder_keeps_its_buffers_in_place(one_thread):
    model = build("zamba2-tiny").eval()
    decoder = make_decoder(model, 1, 12, "static")
    buffers = [decoder.token.data_ptr(), decoder.position.data_ptr()]
    kv = [c.k.data_ptr() for c in decoder.cache.items if hasattr(c, "k")]
    with torch.no_grad():
        decoder.prefill(torch.randint(0, 256, (1, 4)))
        shapes = {tuple(decoder.step(torch.tensor([t])).shape) for t in range(5)}
    assert shapes == {(1, 320)} and decoder.position.item() == 9
    assert [decoder.token.data_ptr(), decoder.position.data_ptr()] == buffers
    assert [c.k.data_ptr() for c in decoder.cache.items if hasattr(c, "k")] == kv and len(kv) == 2


def test_auto_decoding_is_dynamic_on_cpu_and_layouts_without_a_static_step_are_named():
    assert type(make_decoder(build("zamba2-tiny"), 1, 8)).__name__ == "DynamicDecoder"
    assert not_static(build("zamba2-tiny")) == []
    model = build("(M+F:M+E:A+F)x2:H:W", d_model=16, vocab_size=32, **SMALL)
    assert not_static(model) == ["hyena", "moe", "sliding_attention"]
    with pytest.raises(ConfigError, match="these have none: hyena, moe, sliding_attention"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 2, decoding="static")
    with pytest.raises(ConfigError, match="decoding must be one of"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 2, decoding="fast")
    with pytest.raises(ConfigError, match="needs the model on CUDA"):
        build("zamba2-tiny").generate(torch.zeros(1, 2, dtype=torch.long), 2, decoding="cuda_graph")


def test_steps_after_prefill_leave_no_trace_once_cache_and_position_are_put_back(one_thread):
    """What a CUDA-graph capture does at the first step (save the recurrent states, warm-up steps, put them back;
    KV caches are left as the warm-up wrote them), on CPU."""
    model = build("zamba2-tiny").double().eval()
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        full = model(ids)
        decoder = StaticDecoder(model, 1, 9)
        outs = [decoder.prefill(ids[:, :5])]
        saved = [t.clone() for t in [*state_tensors(decoder.cache), decoder.position]]
        for t in range(3):
            decoder.step(torch.tensor([t + 7]))
        for t, s in zip([*state_tensors(decoder.cache), decoder.position], saved, strict=True):
            t.copy_(s)
        outs += [decoder.step(ids[:, t]) for t in range(5, 8)]
    assert max_rel(torch.stack(outs, 1), full[:, 4:8]) < 1e-10
