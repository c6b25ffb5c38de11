"""The native save format (config.json + model.safetensors) and a training run reopened as a model."""

import json

import pytest
import torch
from safetensors import safe_open

import hybrids
from blocks import ConfigError
from hybrids.model import HybridLM, build
from hybrids.save import from_run, saved_tokenizer

TINY = {"d_model": 32, "vocab_size": 64}


def logits_of(model, seed=1):
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("recipe", ["zamba2-tiny", "jamba-tiny", "zamba-tiny"])
def test_round_trip_gives_identical_logits(recipe, tmp_path, one_thread):
    model = build(recipe, **TINY).eval()
    for p in model.parameters():  # away from the initialisation, so that a missed tensor shows
        p.data.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tmp_path / "m", tokenizer="byte")
    loaded = HybridLM.from_pretrained(tmp_path / "m")
    assert torch.equal(logits_of(model), logits_of(loaded))
    assert loaded.config == model.config and not loaded.training
    assert saved_tokenizer(tmp_path / "m") == "byte"
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    stored = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    assert sum(model.state_dict()[n].numel() for n in names) == stored + sum(
        b.numel() for n, b in model.named_buffers() if n in model.state_dict())


def test_tied_embedding_is_stored_once_and_tied_after_loading(tmp_path):
    model = build("zamba-tiny", **TINY)
    assert model.config.tie_embeddings
    model.save_pretrained(tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert len({"embed.weight", "lm_head.weight"} & names) == 1
    loaded = hybrids.from_pretrained(tmp_path / "m")
    assert loaded.lm_head.weight is loaded.embed.weight


def test_shared_block_weights_are_stored_once_and_lora_per_invocation(tmp_path):
    model = build("zamba2-tiny", **TINY)
    model.save_pretrained(tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    shared = [n for n in names if n.startswith("shared.")]
    assert len(shared) == len([n for n, _ in model.shared.named_parameters()])
    assert not any(n.startswith("layers.") and "shared" in n for n in names)


def test_dtype_and_config_file(tmp_path):
    model = build("mamba-tiny", **TINY).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["model"]["layout"] == "M" and config["tokenizer"] is None
    assert hybrids.from_pretrained(tmp_path / "m").embed.weight.dtype == torch.bfloat16
    assert hybrids.from_pretrained(tmp_path / "m", dtype=torch.float32).embed.weight.dtype == torch.float32


def test_bad_folders_say_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match="no such model folder"):
        hybrids.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no config.json"):
        hybrids.from_pretrained(tmp_path / "empty")
    build("mamba-tiny", **TINY).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps(
        {"format": "hybrids", "model": {**build("mamba-tiny", **TINY).config.to_dict(), "d_model": 48}}))
    with pytest.raises(ConfigError, match="do not fit its config"):
        hybrids.from_pretrained(tmp_path / "m")
    with pytest.raises(ConfigError, match="not a training run folder"):
        from_run(tmp_path / "m")


def test_a_training_run_reopens_as_the_model_it_trained(tmp_path, one_thread):
    from hybrids.training.config import compose
    from hybrids.training.run import prepare, train

    config = compose([f"run.dir={tmp_path}", "tracking.enabled=false", "model=zamba2-tiny", "task.seq_len=32",
                      "task.vocab_size=64", "task.num_kv_pairs=4", "trainer.batch_size=4", "trainer.max_steps=3",
                      "trainer.val_every=100", "trainer.progress_bar=false", "schedule.warmup_steps=1"])
    result = train(config)
    model = hybrids.from_run(result.run_dir)
    state = torch.load(result.run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    module, _ = prepare(config)
    module.load_state_dict(state)
    assert torch.equal(logits_of(model), logits_of(module.model.eval()))
    assert not torch.equal(logits_of(model), logits_of(build(config.model).eval()))
    with pytest.raises(ConfigError, match=r"no checkpoint 'nope' .* present: .*last.ckpt"):
        hybrids.from_run(result.run_dir, "nope")
