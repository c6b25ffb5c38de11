"""Initialisation: every recipe starts near ln(vocab) without favouring the input token; SSM inits survive."""

import math

import pytest
import torch
import torch.nn.functional as F

from hybrids.config import recipe_names
from hybrids.model import build

TINY = [n for n in recipe_names() if n.endswith("-tiny")]
# The full recipes at their own depth and layout, narrowed to d_model 64 and vocabulary 512 for the CPU.
NARROW = {
    "zamba-7b": {"blocks.mamba.dt_rank": 4, "blocks.shared_attention.n_heads": 4, "blocks.shared_attention.d_ff": 128},
    "zamba2-1.2b": {"blocks.mamba2.headdim": 16, "blocks.mamba2.d_state": 16, "blocks.shared_attention.n_heads": 4,
                    "blocks.shared_attention.d_ff": 128, "blocks.shared_attention.lora_rank": 8,
                    "blocks.shared_attention.attn_lora_rank": 8},
    "zamba2-2.7b": {"blocks.mamba2.headdim": 16, "blocks.mamba2.d_state": 16, "blocks.shared_attention.n_heads": 4,
                    "blocks.shared_attention.d_ff": 128, "blocks.shared_attention.lora_rank": 8},
    "zamba2-7b": {"blocks.mamba2.headdim": 16, "blocks.mamba2.d_state": 16, "blocks.shared_attention.n_heads": 4,
                  "blocks.shared_attention.d_ff": 128, "blocks.shared_attention.lora_rank": 8},
    "jamba": {"blocks.mamba.dt_rank": 4, "blocks.attention.n_heads": 4, "blocks.attention.n_kv_heads": 2,
              "blocks.mlp.d_ff": 128, "blocks.moe.d_ff": 64},
    "mamba": {},
    "mamba2": {"blocks.mamba2.headdim": 16, "blocks.mamba2.d_state": 16},
    "llama": {"blocks.attention.n_heads": 4, "blocks.mlp.d_ff": 128},
    "striped-hyena": {"blocks.attention.n_heads": 4, "blocks.attention.n_kv_heads": 2, "blocks.mlp.d_ff": 128},
    "hymba": {f"blocks.{attn}.{key}": value for attn in ("attention", "sliding_attention")
              for key, value in (("n_heads", 4), ("n_kv_heads", 2), ("head_dim", 16), ("v_head_dim", 32))}
    | {"blocks.mamba.dt_rank": 4, "blocks.mlp.d_ff": 128},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def initial_losses(model) -> tuple[float, float]:
    """Mean cross-entropy on uniform random ids: of the next token, and of the current (input) token."""
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, 64))
    with torch.no_grad():
        logits = model(ids)
    next_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    current_loss = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
    return next_loss.item(), current_loss.item()


def test_every_full_recipe_has_a_narrow_build_here():
    assert sorted(NARROW) == sorted(n for n in recipe_names() if not n.endswith("-tiny"))


CASES = [(n, {}) for n in TINY] + [(n, {"d_model": 64, "vocab_size": 512, **o}) for n, o in NARROW.items()]
@pytest.mark.parametrize("source, overrides", CASES)
def test_initial_loss_is_about_ln_vocab_and_the_input_token_is_not_favoured(source, overrides):
    model = build(source, backend="torch", **overrides)
    ln_vocab = math.log(model.config.vocab_size)
    next_loss, current_loss = initial_losses(model)
    assert abs(next_loss - ln_vocab) < 0.5, (next_loss, ln_vocab)
    # a unit-variance embedding read back by a tied head gave 0.0 here (and 40-64 for the next token)
    assert current_loss > ln_vocab - 1, (current_loss, ln_vocab)


def test_init_std_sets_embeddings_and_linears_and_leaves_ssm_norm_and_lora_inits():
    model = build("zamba2-tiny", init_std=0.05, d_model=128)
    assert model.embed.weight.std().item() == pytest.approx(0.05, rel=0.05)
    attn = model.shared["A_0"].attn
    assert attn.q_proj.weight.std().item() == pytest.approx(0.05, rel=0.05)
    mamba2 = model.layers[0].mixer
    assert mamba2.in_proj.weight.std().item() == pytest.approx(0.05, rel=0.05)
    assert torch.equal(mamba2.D, torch.ones_like(mamba2.D))
    assert 0 <= mamba2.A_log.exp().min() and mamba2.A_log.exp().max() <= 16  # A_init_range (1, 16)
    assert torch.equal(mamba2.norm.weight, torch.ones_like(mamba2.norm.weight))
    assert torch.equal(model.layers[0].mixer_norm.weight, torch.ones(128))
    for inv in model.shared["A_0"].invocations:  # LoRA adapters start as no-ops
        assert not inv.mlp_lora[1].weight.any() and not any(a[1].weight.any() for a in inv.qkv_lora)
        assert inv.out_proj.weight.std().item() == pytest.approx(0.05, rel=0.05)


def test_mamba_keeps_its_ssm_init_and_mamba_ssm_projections():
    model = build("mamba-tiny")
    mixer = model.layers[0].mixer
    d_state = mixer.config.d_state
    assert torch.allclose(mixer.A_log.exp(), torch.arange(1, d_state + 1.0).expand_as(mixer.A_log))
    assert torch.equal(mixer.D, torch.ones_like(mixer.D))
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
    # PyTorch's default Linear init, as mamba-ssm keeps it: uniform within 1/sqrt(fan_in)
    assert mixer.in_proj.weight.abs().max() <= 64**-0.5


def test_moe_experts_and_router_follow_init_std():
    moe = build("jamba-tiny", init_std=0.03, **{"blocks.moe.d_ff": 256}).layers[1].mlp
    for w in (moe.router.weight, moe.up_proj, moe.down_proj):
        assert w.std().item() == pytest.approx(0.03, rel=0.1)


def test_init_std_must_be_positive():
    from blocks import ConfigError

    with pytest.raises(ConfigError, match="init_std must be positive, got 0"):
        build("mamba-tiny", init_std=0)
