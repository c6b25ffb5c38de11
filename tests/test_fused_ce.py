"""Fused linear cross-entropy (hybrids.training.loss) against F.cross_entropy on the LM head's float logits."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from blocks import ConfigError
from hybrids.model import build
from hybrids.training.loss import default_chunk_size, fused_linear_cross_entropy, resolve_backend
from tests.inputs import max_rel


def plain(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.T).float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def targets_with_ignored(shape, vocab, fraction=0.4):
    targets = torch.randint(0, vocab, shape)
    return targets.masked_fill(torch.rand(shape) < fraction, -100)


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 1000])
def test_loss_and_gradients_equal_cross_entropy(chunk_size):
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = targets_with_ignored((3, 11), 50)
    ref = plain(hidden, weight, targets)
    ref_grads = torch.autograd.grad(ref * 2.5, [hidden, weight])
    loss, correct = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size)
    grads = torch.autograd.grad(loss * 2.5, [hidden, weight])  # a non-unit upstream gradient
    assert abs(loss.item() - ref.item()) < 1e-6 * ref.item()
    assert max(max_rel(g, r) for g, r in zip(grads, ref_grads, strict=True)) < 1e-5
    scored = targets != -100
    expected = ((hidden @ weight.T).argmax(-1) == targets) & scored
    assert torch.equal(correct, expected) and correct.shape == (3, 11)
    assert hidden.grad is None and torch.count_nonzero(grads[0][~scored]) == 0  # unscored rows get no gradient


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_model_gradients_equal_the_plain_loss_for_tied_and_untied_heads(tie, one_thread):
    model = build("zamba2-tiny", tie_embeddings=tie).double()
    ids, targets = torch.randint(0, 320, (2, 12)), targets_with_ignored((2, 12), 320)
    ref = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten(), ignore_index=-100)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    loss, _ = fused_linear_cross_entropy(model(ids, return_hidden=True), model.lm_head.weight, targets, chunk_size=5)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert abs(loss.item() - ref.item()) < 1e-12
    assert (model.lm_head.weight is model.embed.weight) == tie
    assert max(max_rel(g, r) for g, r in zip(grads, ref_grads, strict=True)) < 1e-10


def test_no_grad_and_all_ignored_behave_as_cross_entropy():
    hidden, weight = torch.randn(2, 5, 8), torch.randn(20, 8)
    targets = torch.randint(0, 20, (2, 5))
    with torch.no_grad():
        loss, _ = fused_linear_cross_entropy(hidden, weight, targets)
    assert abs(loss.item() - plain(hidden, weight, targets).item()) < 1e-5
    ignored = torch.full((2, 5), -100)
    assert fused_linear_cross_entropy(hidden, weight, ignored)[0].isnan() and plain(hidden, weight, ignored).isnan()


class LargestOutput(TorchDispatchMode):
    """Records the most elements any op produced."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_holds_all_the_logits():
    n, d, vocab = 256, 16, 512
    hidden = torch.randn(n, 1, d, requires_grad=True)
    weight = torch.randn(vocab, d, requires_grad=True)
    targets = torch.randint(0, vocab, (n, 1))
    sizes = {}
    for name, loss_fn in [("plain", lambda: plain(hidden, weight, targets)),
                          ("fused", lambda: fused_linear_cross_entropy(hidden, weight, targets)[0])]:
        with LargestOutput() as mode:
            loss_fn().backward()
        sizes[name] = mode.largest
    chunk = default_chunk_size(n, d, vocab)
    assert chunk == 8 and sizes["plain"] == n * vocab
    assert sizes["fused"] == max(chunk * vocab, vocab * d)  # one chunk's logits, or the weight's gradient


def test_backend_choice():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "torch" and resolve_backend("torch", cpu) == "torch"
    with pytest.raises(ConfigError, match="needs CUDA tensors and liger-kernel"):
        resolve_backend("liger", cpu)
    with pytest.raises(ConfigError, match="must be one of auto, torch, liger"):
        resolve_backend("triton", cpu)


@pytest.mark.parametrize("fused", ["true", "auto"])
def test_training_step_loss_and_accuracy_match_the_logits_path(fused, one_thread):
    from hybrids.training.config import compose, run_name
    from hybrids.training.run import prepare

    common = ["model=zamba2-tiny", "task=mqar", "trainer.batch_size=4"]
    plain_config = compose([*common, "trainer.fused_ce=false"])
    fused_config = compose([*common, f"trainer.fused_ce={fused}"])
    assert run_name(plain_config) == run_name(fused_config)  # how the loss is computed is not part of a run's identity
    modules = []
    for config in (plain_config, fused_config):
        torch.manual_seed(0)
        modules.append(prepare(config)[0])
    batch = modules[0].task.batch(0, 4, "train")
    (loss, acc), (fused_loss, fused_acc) = (m._train_loss(batch) for m in modules)
    assert fused_config.trainer.fused_ce == (True if fused == "true" else "auto")
    assert abs(fused_loss.item() - loss.item()) < (1e-5 if fused == "true" else 0) + 1e-12 and fused_acc == acc
    if fused == "true":
        assert fused_loss.grad_fn.name() == "ChunkedLinearCrossEntropyBackward"  # auto on CPU: the plain path
    else:
        assert fused_loss.grad_fn.name() != "ChunkedLinearCrossEntropyBackward"


def test_bad_fused_ce_value_is_one_clear_error():
    from hybrids.training.config import compose

    with pytest.raises(ConfigError, match="trainer.fused_ce must be auto, true or false, got 'sometimes'"):
        compose(["trainer.fused_ce=sometimes"])


def test_fused_training_loss_reads_the_batch_documents_and_placement_is_no_part_of_a_run(one_thread):
    from dataclasses import replace

    from hybrids.training.config import compose, run_name
    from hybrids.training.run import prepare

    common = ["model=zamba2-tiny", "task=mqar", "trainer.batch_size=4", "tracking.enabled=false"]
    plain_config = compose([*common, "trainer.fused_ce=false"])
    fused_config = compose([*common, "trainer.fused_ce=true", "trainer.devices=2", "trainer.strategy=ddp"])
    assert run_name(plain_config) == run_name(fused_config)
    modules = []
    for config in (plain_config, fused_config):
        torch.manual_seed(0)
        modules.append(prepare(config)[0])
    batch = modules[0].task.batch(0, 4, "train")
    length = batch.input_ids.shape[1]
    packed = replace(batch, doc_ids=(torch.arange(length) >= length // 3).long().expand(4, -1))  # two documents
    (loss, acc), (fused_loss, fused_acc) = (m._train_loss(packed) for m in modules)
    whole, _ = modules[1]._train_loss(batch)
    assert abs(fused_loss.item() - loss.item()) < 1e-5 and fused_acc == acc
    assert abs(whole.item() - fused_loss.item()) > 1e-4  # the documents reached the model on the fused path


def test_under_autocast_the_fused_loss_runs_the_head_in_the_autocast_dtype_like_f_linear():
    torch.manual_seed(0)
    hidden = torch.randn(2, 16, 8, requires_grad=True)
    weight = torch.randn(32, 8, requires_grad=True)  # fp32 master weights, as under bf16-mixed training
    targets = torch.randint(0, 32, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = fused_linear_cross_entropy(hidden, weight, targets)
        reference = F.cross_entropy(F.linear(hidden, weight).float().flatten(0, 1), targets.flatten())
    assert torch.allclose(loss, reference, atol=2e-2)
    loss.backward()
    assert weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32
