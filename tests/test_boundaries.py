"""Document boundaries: a packed row gives every document the logits (and gradients) it gets alone.

Every block kind is checked in fp64 on rows of three documents whose starts fall inside chunks and exactly on
chunk edges (SSD and delta-rule chunks of 8), plus the ops' chunked forms against their sequential references,
and (GPU-marked) the mamba-ssm kernels' seq_idx; test_boundaries_data.py checks the LM data path.
"""

import logging

import pytest
import torch

from blocks import Block, ops
from blocks.ops import backend
from blocks.ops.backend import importable
from blocks.ops.delta_rule import delta_rule_chunked, delta_rule_ref
from blocks.ops.documents import positions, segments, starts
from blocks.ops.ssd import ssd_chunked, ssd_ref
from hybrids.model import build
from tests.inputs import max_rel, ssd_inputs

SMALL = {"blocks": {
    "mamba": {"d_state": 4},
    "mamba2": {"headdim": 8, "d_state": 4, "chunk_size": 8},
    "attention": {"n_heads": 2, "rope": True, "v_head_dim": 16},
    "sliding_attention": {"n_heads": 2, "rope": True, "window": 5, "v_head_dim": 16},
    "gated_deltanet": {"n_heads": 2, "chunk_size": 8},
    "hyena": {"filter_order": 8, "l_max": 64},
    "shared_attention": {"n_heads": 2, "lora_rank": 2, "attn_lora_rank": 2, "rope": True},
}}
LAYOUTS = {"M": "M:M", "M2": "M2:M2", "A": "A:A", "W": "W:W", "G": "G:G", "H": "H:H", "parallel": "(A|M2):(W|M)",
           "shared": "M2:A*:M:A*"}
# Two rows of 29 tokens: starts inside chunks of 8 (11, 19) and on chunk edges (8, 24); labels need not be sorted.
LENGTHS = [(11, 8, 10), (8, 16, 5)]
LABELS = [(0, 1, 2), (5, 2, 9)]


def packed_doc_ids() -> torch.Tensor:
    rows = [torch.cat([torch.full((n,), label) for n, label in zip(lengths, labels, strict=True)])
            for lengths, labels in zip(LENGTHS, LABELS, strict=True)]
    return torch.stack(rows)  # (2, 29)


def documents():
    """(row, start, end) of every document."""
    for row, lengths in enumerate(LENGTHS):
        start = 0
        for n in lengths:
            yield row, start, start + n
            start += n


def tiny(layout: str):
    torch.manual_seed(0)
    return build(layout, d_model=16, vocab_size=32, **SMALL).double()


def test_document_helpers():
    doc = torch.tensor([[4, 4, 1, 1, 1, 4], [0, 0, 0, 0, 0, 0]])
    assert segments(doc).tolist() == [[0, 0, 1, 1, 1, 2], [0] * 6]
    assert starts(doc).tolist() == [[False, False, True, False, False, True], [False] * 6]
    assert positions(doc).tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_packed_logits_equal_each_document_alone(kind, one_thread):
    model = tiny(LAYOUTS[kind])
    ids, doc = torch.randint(0, 32, (2, 29)), packed_doc_ids()
    packed, leaky = model(ids, doc_ids=doc), model(ids)
    for row, start, end in documents():
        alone = model(ids[row : row + 1, start:end])[0]
        assert max_rel(packed[row, start:end], alone) < 1e-12, (kind, row, start)
        if start > 0:  # without document ids the earlier documents leak in: the test can see a leak
            assert max_rel(leaky[row, start:end], alone) > 1e-4, (kind, row, start)


@pytest.mark.parametrize("kind", ["M2", "A", "G", "shared"])
def test_packed_gradients_equal_the_sum_over_documents_alone(kind, one_thread):
    model = tiny(LAYOUTS[kind])
    ids, doc = torch.randint(0, 32, (2, 29)), packed_doc_ids()
    weight = torch.randn(2, 29, 32, dtype=torch.float64)
    packed = torch.autograd.grad((model(ids, doc_ids=doc) * weight).sum(), list(model.parameters()),
                                 allow_unused=True)
    alone = sum((model(ids[r : r + 1, s:e])[0] * weight[r, s:e]).sum() for r, s, e in documents())
    alone = torch.autograd.grad(alone, list(model.parameters()), allow_unused=True)
    pairs = [(p, a) for p, a in zip(packed, alone, strict=True) if a is not None]
    assert len(pairs) > 10 and max(max_rel(p, a) for p, a in pairs) < 1e-10


def test_doc_ids_are_refused_with_a_cache_or_a_wrong_shape():
    model = tiny("M2")
    ids = torch.randint(0, 32, (2, 29))
    with pytest.raises(ValueError, match="without a cache"):
        model(ids, model.allocate_cache(2, 29), doc_ids=packed_doc_ids())
    with pytest.raises(ValueError, match="must match input_ids"):
        model(ids[:, :10], doc_ids=packed_doc_ids())


@pytest.mark.parametrize("chunk", [4, 8, 32])
def test_ssd_chunked_resets_as_the_sequential_reference(chunk):
    x, dt, A, B, C, D, z, bias = ssd_inputs(length=29)
    doc = packed_doc_ids()
    initial = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    y, final = ssd_chunked(x, dt, A, B, C, chunk, D, z, bias, True, initial, True, doc_ids=doc)
    y_ref, final_ref = ssd_ref(x, dt, A, B, C, D, z, bias, True, initial, True, doc_ids=doc)
    assert max_rel(y, y_ref) < 1e-12 and max_rel(final, final_ref) < 1e-12
    # the last document alone from a zero state ends in the same state
    _, last = ssd_ref(x[:, 24:], dt[:, 24:], A, B[:, 24:], C[:, 24:], D, None, bias, True, None, True)
    assert max_rel(final[1], last[1]) < 1e-12


@pytest.mark.parametrize("chunk", [4, 8, 32])
def test_delta_rule_chunked_resets_as_the_sequential_reference(chunk):
    q, k = (torch.nn.functional.normalize(torch.randn(2, 29, 3, 4, dtype=torch.float64), dim=-1) for _ in range(2))
    v = torch.randn(2, 29, 3, 5, dtype=torch.float64)
    g, beta = -torch.rand(2, 29, 3, dtype=torch.float64), torch.rand(2, 29, 3, dtype=torch.float64)
    initial, doc = torch.randn(2, 3, 4, 5, dtype=torch.float64), packed_doc_ids()
    o, final = delta_rule_chunked(q, k, v, g, beta, chunk, None, initial, True, doc_ids=doc)
    o_ref, final_ref = delta_rule_ref(q, k, v, g, beta, None, initial, True, doc_ids=doc)
    assert max_rel(o, o_ref) < 1e-12 and max_rel(final, final_ref) < 1e-12


def test_conv_taps_stop_at_a_document_start():
    x, w = torch.randn(1, 3, 6, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    doc = torch.tensor([[0, 0, 0, 1, 1, 1]])
    y = ops.causal_conv1d(x, w, backend="torch", doc_ids=doc)
    assert torch.equal(y[..., :3], ops.causal_conv1d(x[..., :3], w, backend="torch"))
    assert max_rel(y[..., 3:], ops.causal_conv1d(x[..., 3:], w, backend="torch")) < 1e-15


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and importable("mamba_ssm")), reason="needs CUDA and mamba_ssm")
@pytest.mark.parametrize("layout", ["M2", "M"])
def test_kernels_reset_at_boundaries_as_the_torch_path(layout, caplog):
    """Mamba2's SSD kernel (and causal-conv1d's, when installed) take seq_idx; Mamba1's scan falls back, warning.
    fp32 logits and gradients of the kernel path against the PyTorch path, 64-token kernel chunks."""
    torch.manual_seed(0)
    doc = packed_doc_ids().repeat_interleave(9, dim=1).cuda()  # (2, 261)
    model = build(layout, d_model=64, vocab_size=32, backend="mamba_ssm",
                  **{"blocks.mamba2.headdim": 16, "blocks.mamba2.chunk_size": 64}).cuda()
    ids, weight = torch.randint(0, 32, doc.shape, device="cuda"), torch.randn(*doc.shape, 32, device="cuda")
    backend.warn_no_boundaries.cache_clear()
    outs = []
    for name in ("mamba_ssm", "torch"):
        for block in model.modules():
            if isinstance(block, Block) and hasattr(block.config, "backend"):
                block.config.backend = name
        with caplog.at_level(logging.WARNING, logger="hybrids"):
            logits = model(ids, doc_ids=doc)
        outs.append((logits, torch.autograd.grad((logits * weight).sum(), list(model.parameters()))))
    (kernel, kernel_grads), (reference, reference_grads) = outs
    assert max_rel(kernel, reference) < 5e-3
    assert max(max_rel(k, r) for k, r in zip(kernel_grads, reference_grads, strict=True)) < 5e-3
    assert ("selective_scan_fn (Mamba1) cannot reset its state" in caplog.text) == (layout == "M")
    alone = model(ids[1:, 216:])[0]  # the last document of row 1, on the torch path
    assert max_rel(reference[1, 216:], alone) < 1e-4
