"""The LightningModule around HybridLM: loss on scored positions, MoE balance loss, LR schedule,
metrics, and a stop at the first non-finite loss.

On a GPU a training step keeps the host ahead of the device: batches arrive in page-locked memory and are copied
without waiting, the step's metrics are logged after the backward pass is queued (their bookkeeping then overlaps it),
host-side numbers are logged as CPU tensors (a Python number would be copied to the GPU, which waits for it), the
progress bar's metrics (read back every step) only when a bar is shown, and AdamW is the fused kernel. What remains
is one sync a step of ours, the non-finite loss check, and three of liger-kernel's fused cross-entropy (measured on
an H200: tests/test_gpu_training_step.py)."""

from __future__ import annotations

import math
import resource
import time

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

from hybrids import accounting
from hybrids.model import HybridLM
from hybrids.training.config import TrainConfig
from hybrids.training.data import rank_slice
from hybrids.training.loss import fused_linear_cross_entropy
from hybrids.training.prefetch import data_workers, step_loader
from hybrids.training.schedules import Schedule
from hybrids.training.tasks import Batch, Task
from hybrids.training.tasks.base import IGNORE_INDEX, accuracy


class StepIndices(IterableDataset):
    """0, 1, 2, ... forever: the trainer's clock. Batches are built from `global_step`, not from these."""

    def __iter__(self):
        i = 0
        while True:
            yield i
            i += 1


class LitHybrid(L.LightningModule):
    def __init__(self, config: TrainConfig, task: Task, schedule: Schedule):
        super().__init__()
        self.config, self.task, self.schedule = config, task, schedule
        self.model = HybridLM(config.model)
        compile_mode = config.trainer.compile_mode
        self.backbone = torch.compile(self.model, mode=compile_mode) if config.trainer.compile else self.model
        self.stop_reason: str | None = None
        self._tick: tuple[float, int] | None = None
        self._flops: tuple[int, float] | None = None  # (training FLOPs per token, device peak FLOP/s), on CUDA
        self._pending: dict | None = None  # the step's metrics, logged once its backward is queued
        self.prog_bar = False  # set by train() when Lightning's bar is shown

    def train_dataloader(self):
        workers = data_workers(self.config.trainer.data_workers, self.device.type == "cuda")
        if workers == 0:
            return DataLoader(StepIndices(), batch_size=None)  # batches are built in training_step
        return step_loader(self.task, self.config.trainer.batch_size, self.trainer.global_step, self.global_rank,
                           self.trainer.world_size, workers, pin_memory=self.device.type == "cuda")

    def val_dataloader(self):
        return DataLoader(range(self.config.trainer.val_batches), batch_size=None)

    def _to_device(self, batch: Batch) -> Batch:
        """This process's slice of a global batch (all of it in a one-process run), on the module's device."""
        batch = rank_slice(batch, self.global_rank, self.trainer.world_size)
        if self.device.type == "cuda":
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)

    def transfer_batch_to_device(self, item, device, dataloader_idx):
        """A data worker's (step, batch), pinned by the DataLoader, copied without waiting; other items as
        Lightning moves them."""
        if isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[1], Batch):
            return item[0], item[1].to(device, non_blocking=device.type == "cuda")
        return super().transfer_batch_to_device(item, device, dataloader_idx)

    def _loss(self, batch: Batch):
        logits = self.backbone(batch.input_ids, doc_ids=batch.doc_ids)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten(), ignore_index=-100)
        return logits, loss

    def _train_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, accuracy) of a training batch; with trainer.fused_ce the LM head runs inside the loss, which never
        holds the (B, L, V) logits (validation keeps the logits: its metrics read them)."""
        fused = self.config.trainer.fused_ce
        if fused is False or (fused == "auto" and self.device.type != "cuda"):
            logits, loss = self._loss(batch)
            return loss, self.task.metrics(logits.detach(), batch)["accuracy"]
        hidden = self.backbone(batch.input_ids, return_hidden=True, doc_ids=batch.doc_ids)
        loss, correct = fused_linear_cross_entropy(hidden, self.model.lm_head.weight, batch.targets, IGNORE_INDEX)
        return loss, accuracy(correct, batch.targets != IGNORE_INDEX)

    def training_step(self, item, _batch_idx):
        step = self.global_step
        if isinstance(item, tuple | list):  # (step, batch) built ahead by a data worker (prefetch.py)
            if int(item[0]) != step:
                raise RuntimeError(f"a data worker built the batch of step {int(item[0])} for step {step}")
            batch = item[1].to(self.device)
        else:
            batch = self._to_device(self.task.batch(step, self.config.trainer.batch_size, "train"))
        loss, train_accuracy = self._train_loss(batch)
        total = loss
        aux = self.model.aux_loss()
        if aux is not None:
            total = loss + self.config.optim.aux_loss_coef * aux
        if not torch.isfinite(total):
            # returning None skips backward and the optimizer step: the weights stay finite
            self.stop_reason = f"non-finite loss {total.item()} at step {step}"
            self.trainer.should_stop = True
            return None
        self._pending = {"loss": loss.detach(), "accuracy": train_accuracy, "step": step,
                         "aux": None if aux is None else aux.detach(), "size": batch.input_ids.shape[0],
                         "seq_len": batch.input_ids.shape[1]}
        return total

    def on_after_backward(self) -> None:
        """Log the training step's metrics, its backward now queued on the device."""
        if self._pending is None:
            return
        p, self._pending = self._pending, None
        tokens = p["size"] * p["seq_len"] * self.trainer.world_size  # of the global batch
        if p["aux"] is not None:
            self.log("train/aux_loss", p["aux"], on_step=True, batch_size=p["size"])
        self.log_dict({"train/loss": p["loss"], "train/accuracy": p["accuracy"]}, on_step=True,
                      prog_bar=self.prog_bar, batch_size=p["size"],
                      sync_dist=self.trainer.world_size > 1)  # the global batch's
        self.log_dict({"lr": _host(self.optimizers().param_groups[0]["lr"]),
                       "data/phase2_fraction": _host(self.schedule.phase2_fraction(p["step"])),
                       "tokens": _host((p["step"] + 1) * tokens)}, on_step=True, batch_size=p["size"])
        self._log_speed(tokens, p["seq_len"])

    def _log_speed(self, tokens: int, seq_len: int) -> None:
        """perf/tokens_per_s (global batch), perf/memory_gib (this process) and, on a GPU with a known peak,
        perf/mfu: training FLOPs per token from the share-aware accounting (shared blocks counted per
        invocation) x tokens/s over the peak bf16 FLOP/s of all ranks' devices."""
        now = time.perf_counter()
        if self._flops is None and (peak := accounting.peak_flops(self.device)):
            self._flops = (accounting.stats(self.config.model, seq_len=seq_len).flops_training, peak)
        if self._tick is not None and now > self._tick[0]:
            rate = tokens * (self.global_step - self._tick[1]) / (now - self._tick[0])
            self.log("perf/tokens_per_s", _host(rate), on_step=True, prog_bar=self.prog_bar, batch_size=1)
            if self._flops is not None:
                self.log("perf/mfu", _host(rate * self._flops[0] / (self._flops[1] * self.trainer.world_size)),
                         on_step=True, batch_size=1)
        self._tick = (now, self.global_step)
        if self.device.type == "cuda":
            memory = torch.cuda.max_memory_allocated() / 2**30
        else:  # peak resident memory of the process (Linux reports KiB)
            memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        self.log("perf/memory_gib", _host(memory), on_step=True, batch_size=1)

    def validation_step(self, index, _batch_idx):
        batch = self._to_device(self.task.batch(int(index), self.config.trainer.batch_size, "val"))
        logits, loss = self._loss(batch)
        metrics = {f"val/{k}": v for k, v in self.task.metrics(logits, batch).items() if math.isfinite(float(v))}
        self.log_dict({"val/loss": loss, **metrics}, on_epoch=True, batch_size=batch.input_ids.shape[0],
                      sync_dist=self.trainer.world_size > 1)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip by the global gradient norm; under FSDP by the root unit's clip_grad_norm_, the norm over every
        rank's shard (Lightning's own clipping refuses FSDP, and clipping each shard alone would be wrong)."""
        clip = self.config.optim.grad_clip
        if clip and self.config.trainer.strategy == "fsdp":
            self.trainer.strategy.model.clip_grad_norm_(clip)
            return
        if clip and optimizer.defaults.get("fused"):
            # Lightning's mixed-precision plugin refuses to clip for a fused optimizer, which could unscale fp16
            # gradients itself; a fused AdamW runs only where nothing is scaled (see configure_optimizers)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _fused_adamw(self) -> bool:
        """The fused AdamW kernel on CUDA (a few launches a step, no per-parameter host work), except under FSDP
        (untested there) and fp16 (its gradients are scaled, and they must be unscaled before clipping)."""
        return (self.config.trainer.strategy != "fsdp" and self.trainer.precision != "16-mixed"
                and all(p.is_cuda for p in self.model.parameters()))

    def configure_optimizers(self):
        o = self.config.optim
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=tuple(o.betas), fused=self._fused_adamw() or None)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.schedule.lambda_lr(optimizer), "interval": "step"}}


def _host(value: float) -> torch.Tensor:
    """A host-side number as Lightning logs it without a copy to the GPU: a CPU tensor (float64: token counts
    stay exact)."""
    return torch.tensor(float(value), dtype=torch.float64)


def logged_metrics(task: Task, batch_size: int, val_batches: int) -> list[str]:
    """The names of the scalar metrics a run of `task` ends with (a sweep's objective reads one of them).

    Validation metrics come from the task's own `metrics` on the validation batches a run scores, so that
    batch-dependent names (LongCopy's recall@{d}) are found as a run would find them.
    """
    names = {"val/loss", "train/loss", "train/accuracy", "lr", "data/phase2_fraction", "tokens"}
    for index in range(val_batches):
        batch = task.batch(index, batch_size, "val")
        logits = torch.zeros(*batch.input_ids.shape, task.vocab_size)  # (B, L, V)
        names |= {f"val/{k}" for k in task.metrics(logits, batch)}
    return sorted(names)
