"""The models of issue 10's speed comparison, HF transformers' and ours, at full size or tiny (CPU), random init.

- Zamba2 170M: HF's Zamba2Config at hidden 1024, 12 Mamba2 layers with "hybrid" at 5 and 11, 2 shared blocks with
  attention adapters (LoRA 64), d_state 64, 32 Mamba heads, ffn 4096, vocab 32000. Ours is `from_hf` of that model.
- Llama 187M: HF's LlamaConfig at hidden 1024, 12 layers, 16 heads, ffn 2816, vocab 32000, tied, SDPA; ours is the
  `llama` recipe (the same sizes). --tiny shrinks both to a CPU-sized model with the same structure.
Nothing is downloaded: the weights are random.
"""

from __future__ import annotations

import torch

from hybrids.accounting import peak_flops as device_peak_flops
from hybrids.accounting import stats
from hybrids.model import HybridLM, build


def zamba2_config(tiny: bool, max_positions: int = 4096):
    import transformers

    size = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, mamba_d_state=16, n_mamba_heads=4,
                intermediate_size=128, vocab_size=256, adapter_rank=8,
                layers_block_type=["mamba", "hybrid", "mamba", "hybrid"]) if tiny else \
        dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, mamba_d_state=64, n_mamba_heads=32,
             intermediate_size=4096, vocab_size=32000, adapter_rank=64,
             layers_block_type=["mamba"] * 5 + ["hybrid"] + ["mamba"] * 5 + ["hybrid"])
    return transformers.Zamba2Config(num_mem_blocks=2, use_shared_attention_adapter=True,
                                     max_position_embeddings=max_positions, attn_implementation="sdpa", **size)


def llama_config(tiny: bool, max_positions: int = 4096):
    import transformers

    size = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=176, vocab_size=256) \
        if tiny else dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, intermediate_size=2816,
                          vocab_size=32000)
    return transformers.LlamaConfig(tie_word_embeddings=True, max_position_embeddings=max_positions,
                                    attn_implementation="sdpa", **size)


def hf_model(family: str, tiny: bool, max_positions: int = 4096) -> torch.nn.Module:
    """HF's Zamba2ForCausalLM ("zamba2") or LlamaForCausalLM ("llama"), random init, on CPU."""
    import transformers

    if family == "zamba2":
        return transformers.Zamba2ForCausalLM(zamba2_config(tiny, max_positions))
    return transformers.LlamaForCausalLM(llama_config(tiny, max_positions))


def our_model(family: str, tiny: bool, hf: torch.nn.Module | None = None, **overrides) -> HybridLM:
    """Ours: from_hf of the HF Zamba2 model `hf` ("zamba2"), or the llama recipe at the HF Llama's size ("llama")."""
    if family == "zamba2":
        from hybrids.hf.interop import from_hf

        return from_hf(hf if hf is not None else hf_model("zamba2", tiny), **overrides)
    return build("llama-tiny" if tiny else "llama", **({"vocab_size": 256, "tie_embeddings": True} if tiny else {}),
                 **overrides)


def training_flops_per_token(model: HybridLM, seq_len: int) -> int:
    """Training FLOPs per token from our share-aware accounting (shared blocks counted at every invocation)."""
    return stats(model, seq_len=seq_len).flops_training


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """The device's peak bf16 FLOP/s: the override, else hybrids.accounting.peak_flops (None where unknown)."""
    return override_tflops * 1e12 if override_tflops else device_peak_flops(device)
