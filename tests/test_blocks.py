import pytest
import torch

import blocks
from blocks.attention import Attention, AttentionConfig
from blocks.mamba import Mamba, MambaConfig
from blocks.mamba2 import Mamba2, Mamba2Config
from blocks.mlp import MLP, MLPConfig
from blocks.moe import MoE, MoEConfig
from blocks.shared import SharedAttention, SharedAttentionConfig
from tests.inputs import max_rel

D = 16
CASES = {
    "mamba": lambda: Mamba(MambaConfig(d_model=D, d_state=4, backend="torch")),
    "mamba_heads_jamba_norms": lambda: Mamba(MambaConfig(d_model=D, d_state=4, n_heads=2, inner_norms=True)),
    "mamba2": lambda: Mamba2(Mamba2Config(d_model=D, d_state=8, headdim=8, chunk_size=4)),
    "mamba2_groups": lambda: Mamba2(Mamba2Config(d_model=D, d_state=8, headdim=4, ngroups=2, chunk_size=8)),
    "attention_gqa_rope": lambda: Attention(AttentionConfig(d_model=D, n_heads=4, n_kv_heads=2, rope=True)),
    "shared_lora": lambda: SharedAttention(SharedAttentionConfig(
        d_model=D, n_heads=4, d_ff=24, n_invocations=3, lora_rank=2, attn_lora_rank=2, rope=True)),
    "mlp": lambda: MLP(MLPConfig(d_model=D, d_ff=24, activation="silu")),
    "moe": lambda: MoE(MoEConfig(d_model=D, d_ff=8, n_experts=4, top_k=2)),
}


def _randomize(block):
    """Move every parameter off its initial value (LoRA up-projections start at zero)."""
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return block.double()


def _context(block, length):
    if isinstance(block, SharedAttention):
        return {"emb": torch.randn(2, length, D, dtype=torch.float64), "invocation": 1}
    return {}


@pytest.mark.parametrize("name", list(CASES))
def test_step_by_step_equals_full_forward_after_prefill(name):
    block = _randomize(CASES[name]())
    length, prefill = 11, 5
    x = torch.randn(2, length, D, dtype=torch.float64)
    ctx = _context(block, length)
    full = block(x, **ctx)
    cache = block.allocate_cache(2, length, dtype=torch.float64)
    sub = lambda a, b: {k: v[:, a:b] if torch.is_tensor(v) else v for k, v in ctx.items()}  # noqa: E731
    outs = [block(x[:, :prefill], cache, **sub(0, prefill))]
    outs += [block.step(x[:, t : t + 1], cache, **sub(t, t + 1)) for t in range(prefill, length)]
    assert full.shape == x.shape
    assert max_rel(torch.cat(outs, 1), full) < 1e-10


@pytest.mark.parametrize("name", list(CASES))
def test_cache_bytes_equal_allocated_cache(name):
    block = CASES[name]()
    cache = block.allocate_cache(3, 20, dtype=torch.bfloat16)
    expected = block.cache_bytes(3, 20, torch.bfloat16)
    assert (cache.nbytes() if cache is not None else 0) == expected["kv"] + expected["state"]


def test_mamba_is_causal_and_finite_in_bf16():
    block = Mamba(MambaConfig(d_model=D, n_heads=2)).bfloat16()
    x = torch.randn(1, 30, D).bfloat16()
    y = block(x)
    x2 = x.clone()
    x2[:, 20:] = 0
    assert torch.isfinite(y.float()).all()
    assert torch.equal(block(x2)[:, :20], y[:, :20])


def test_registry_lookup_by_name_and_symbol():
    assert blocks.get("M2").cls is Mamba2 and blocks.get("mamba2").cls is Mamba2
    assert blocks.get("E").config_cls is MoEConfig and blocks.get("moe").kind == "mlp"
    assert [e.symbol for e in blocks.entries()][:5] == ["M", "M2", "A", "F", "E"]


def test_registry_unknown_name_lists_valid_ones():
    with pytest.raises(blocks.RegistryError) as err:
        blocks.get("mamba3")
    assert str(err.value).startswith("unknown block 'mamba3'; valid blocks: M (mamba), M2 (mamba2), A (attention), "
                                     "F (mlp), E (moe), S (shared_attention)")
    assert "W (sliding_attention)" in str(err.value) and "P (parallel)" in str(err.value)


def test_registry_rejects_duplicates():
    with pytest.raises(blocks.RegistryError, match="block name 'mamba' is already registered"):
        blocks.register("mamba", "Q", MambaConfig, "mixer")(type("Other", (), {}))
    with pytest.raises(blocks.RegistryError, match="block symbol 'M2' is already registered"):
        blocks.register("other", "M2", MambaConfig, "mixer")(type("Other", (), {}))
    with pytest.raises(ValueError, match="upper-case letter"):
        blocks.register("other", "m", MambaConfig, "mixer")


def test_shared_block_uses_one_weight_set_for_every_invocation():
    block = SharedAttention(SharedAttentionConfig(d_model=D, n_heads=4, n_invocations=3, lora_rank=2))
    x, emb = torch.randn(1, 6, D), torch.randn(1, 6, D)
    ys = [block(x, emb=emb, invocation=i) for i in range(3)]
    sum(y.sum() for y in ys).backward()
    # the same Parameter objects serve all invocations: their gradients sum over the three calls
    shared_names = {n for n, _ in block.named_parameters() if not n.startswith("invocations.")}
    assert {"attn.q_proj.weight", "mlp.up_proj.weight", "input_norm.weight"} <= shared_names
    assert block.attn.q_proj.weight.grad is not None
    assert len(block.shared_parameters()) == len(shared_names)
    inv = block.invocations
    assert inv[0].out_proj.weight is not inv[1].out_proj.weight
    assert inv[0].mlp_lora[0].weight.shape == (2, D) and inv[0].mlp_lora[1].weight.shape == (2 * 4 * D, 2)
    assert not torch.equal(ys[0], ys[1])  # per-invocation output projections differ
    single = sum(p.numel() for p in block.shared_parameters())
    per_invocation = sum(p.numel() for p in inv[0].parameters())
    assert sum(p.numel() for p in block.parameters()) == single + 3 * per_invocation


def test_shared_block_concat_doubles_attention_width_and_zamba_scale():
    block = SharedAttention(SharedAttentionConfig(d_model=D, n_heads=4, d_ff=32))
    assert block.attn.q_proj.weight.shape == (2 * D, 2 * D) and block.attn.o_proj.weight.shape == (D, 2 * D)
    assert block.attn.config.head_dim == 8 and block.attn.config.softmax_scale == pytest.approx(4**-0.5)
    plain = SharedAttention(SharedAttentionConfig(d_model=D, n_heads=4, concat_embeddings=False))
    assert plain.attn.q_proj.weight.shape == (D, D)
    with pytest.raises(blocks.ConfigError, match="needs the original embeddings"):
        block(torch.randn(1, 3, D))


def test_moe_routes_top_k_and_exposes_balance_loss():
    moe = MoE(MoEConfig(d_model=D, d_ff=8, n_experts=4, top_k=2))
    x = torch.randn(3, 7, D)
    y = moe(x)
    probs, weights, experts = moe.route(x.reshape(-1, D))
    manual = torch.zeros(21, D)
    for t in range(21):
        for w, e in zip(weights[t], experts[t], strict=True):
            gate, up = (x.reshape(-1, D)[t] @ moe.up_proj[e].T).chunk(2)
            manual[t] += w * (torch.nn.functional.silu(gate) * up) @ moe.down_proj[e].T
    assert max_rel(y.reshape(-1, D), manual) < 1e-5
    # balance loss: n_experts * sum_k,e f_ke * P_e; with uniform router probabilities it equals top_k
    loss = moe.aux_loss()
    f = torch.nn.functional.one_hot(experts, 4).float().mean(0)
    assert loss.item() == pytest.approx(4 * (f * probs.mean(0)).sum().item(), rel=1e-6)
    uniform = torch.full((10, 4), 0.25)
    assert blocks.moe.load_balancing_loss(uniform, torch.tensor([[0, 1], [2, 3]] * 5), 4).item() == pytest.approx(2.0)


def test_moe_capacity_drops_latest_assignments_first():
    moe = MoE(MoEConfig(d_model=D, d_ff=8, n_experts=2, top_k=1, capacity_factor=0.5))
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 10.0  # every token with x[0] > 0 goes to expert 0
    x = torch.randn(1, 8, D)
    x[0, :, 0] = 1.0
    y = moe(x)
    # capacity = ceil(0.5 * 8 * 1 / 2) = 2: tokens 0 and 1 are served, 2..7 dropped
    assert torch.count_nonzero(y.abs().sum(-1)) == 2 and y[0, :2].abs().sum() > 0
    assert moe.dropped_fraction == pytest.approx(6 / 8)
    assert MoE(MoEConfig(d_model=D, n_experts=2, top_k=1))(x).abs().sum(-1).gt(0).all()


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: MambaConfig(d_model=10, n_heads=3), "not divisible by n_heads = 3"),
        (lambda: Mamba2Config(d_model=16, headdim=24), "not divisible by headdim = 24"),
        (lambda: Mamba2Config(d_model=16, headdim=8, chunk_size=48), "chunk_size must be a power of two"),
        (lambda: AttentionConfig(d_model=16, n_heads=6, n_kv_heads=4), "multiple of n_kv_heads"),
        (lambda: MoEConfig(d_model=8, n_experts=4, top_k=5), "top_k must be in 1..n_experts"),
        (lambda: MLPConfig(d_model=8, activation="swishh"), "activation must be one of"),
        (lambda: MambaConfig(d_model=8, backend="cuda"), "backend must be one of auto, torch, mamba_ssm"),
    ],
)
def test_config_errors_are_clear(make, message):
    with pytest.raises(blocks.ConfigError, match=message):
        make()


def test_backend_mamba_ssm_refused_on_cpu():
    block = Mamba(MambaConfig(d_model=8, backend="mamba_ssm"))
    with pytest.raises(blocks.ConfigError, match="needs CUDA tensors"):
        block(torch.randn(1, 4, 8))


@pytest.fixture
def fake_imports(monkeypatch):
    """Imports as seen by the backend: mamba_ssm fails as it does without its CUDA extension; records calls."""
    from blocks.ops import backend

    calls = []

    def import_module(name):
        calls.append(name)
        raise ImportError("libcudart.so.13: cannot open shared object file")

    backend.import_error.cache_clear()
    backend._warn_no_kernels.cache_clear()
    monkeypatch.setattr(backend.importlib, "import_module", import_module)
    yield calls
    backend.import_error.cache_clear()
    backend._warn_no_kernels.cache_clear()


def test_backend_auto_on_a_gpu_without_kernels_warns_once_with_the_import_error(fake_imports, caplog):
    from blocks.ops.backend import resolve

    cuda = torch.device("cuda")
    assert [resolve("auto", cuda) for _ in range(3)] == ["torch"] * 3
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["backend auto on CUDA: mamba_ssm does not import (ImportError: libcudart.so.13: cannot open "
                        "shared object file); using the PyTorch ops, which are much slower (install the kernels with "
                        "pip install .[cuda], or set backend=torch to silence this)"]
    assert fake_imports == ["mamba_ssm"]
    with pytest.raises(blocks.ConfigError, match=r"mamba_ssm does not import \(ImportError: libcudart.so.13"):
        resolve("mamba_ssm", cuda)
    assert resolve("torch", cuda) == "torch"


def test_backend_auto_on_cpu_is_silent_and_never_imports_mamba_ssm(fake_imports, caplog):
    from blocks.ops.backend import resolve

    assert resolve("auto", torch.device("cpu")) == "torch"
    assert fake_imports == [] and not [r for r in caplog.records if r.levelname == "WARNING"]


def test_blocks_build_on_meta_device():
    with torch.device("meta"):
        block = Mamba(MambaConfig(d_model=4096, d_state=16, n_heads=2))
    assert block.A_log.is_meta and sum(p.numel() for p in block.parameters()) > 10**8


def test_mamba_ssm_is_never_imported_on_cpu():
    import subprocess
    import sys

    code = ("import sys, torch, blocks, hybrids.model as hm; m = hm.build('zamba-tiny'); m(torch.zeros(1, 4).long());"
            "m.generate(torch.zeros(1, 2).long(), 2); assert 'mamba_ssm' not in sys.modules, 'imported'")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
