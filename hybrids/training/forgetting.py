"""Catastrophic forgetting across a two-phase schedule: the phase-1 validation loss before phase 2 and after.

A two-phase run validates on phase-1 data (`MixedTask`), so its `val/loss` is the phase-1 loss. This callback
logs it as `val/phase1_loss` at every validation, remembers the last value measured before any phase-2 step
(a validation after `global_step <= phase2_start_step` optimizer steps), and from then on logs

    forgetting = val/phase1_loss (now) - val/phase1_loss (last validation before phase 2)

in nats per token: > 0 when phase 2 made the model worse on phase-1 data. A run's final `forgetting` is the value
at its last validation. Put a validation at the phase boundary (trainer.val_every dividing the phase-2 start
step); otherwise "before" is the last validation in phase 1, earlier than the boundary.
"""

from __future__ import annotations

import math

import lightning as L

BEFORE_KEY = "phase1_loss_before_phase2"
FORGETTING_METRICS = ("val/phase1_loss", "forgetting")  # what a run with a phase 2 logs besides logged_metrics


class ForgettingCallback(L.Callback):
    """Logs val/phase1_loss and forgetting (see the module docstring) for a schedule with a phase 2.

    Args:
        phase2_start_step: the schedule's first phase-2 step (`Schedule.phase2_start_step`).
    """

    def __init__(self, phase2_start_step: int):
        self.phase2_start_step = phase2_start_step
        self.before: float | None = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or "val/loss" not in trainer.callback_metrics:
            return
        loss = float(trainer.callback_metrics["val/loss"])
        if not math.isfinite(loss):
            return
        pl_module.log("val/phase1_loss", loss, on_epoch=True, batch_size=1)
        if trainer.global_step <= self.phase2_start_step:
            self.before = loss
        elif self.before is not None:
            pl_module.log("forgetting", loss - self.before, on_epoch=True, batch_size=1)

    def state_dict(self) -> dict:
        return {BEFORE_KEY: self.before}

    def load_state_dict(self, state_dict: dict) -> None:
        self.before = state_dict.get(BEFORE_KEY)
