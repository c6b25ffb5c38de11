"""Progress a log file can hold: one plain line every few seconds instead of a redrawn bar.

`hybrids train ... > log.txt` (stdout not a terminal) or `trainer.progress_bar=false` gets lines like

    step 120/300  loss 2.3456  val/loss 2.4012  val/accuracy 0.1250  41.2k tok/s  eta 1m05s

while a terminal keeps Lightning's progress bar.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

import lightning as L


def format_duration(seconds: float) -> str:
    """12s, 3m05s, 2h07m: short enough for a progress line, exact enough to plan by."""
    if not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_rate(per_second: float) -> str:
    """41234.5 -> "41.2k"."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if per_second >= limit:
            return f"{per_second / limit:.1f}{suffix}"
    return f"{per_second:.0f}"


def use_bar(progress_bar: bool, stream=None) -> bool:
    """Lightning's bar only where someone watches it: asked for, and stdout is a terminal."""
    stream = sys.stdout if stream is None else stream
    return progress_bar and hasattr(stream, "isatty") and stream.isatty()


class ProgressLines(L.Callback):
    """Print step/max_steps, the training loss, the latest validation metrics, tokens/s and the ETA
    at most every `every_s` seconds of training (0: after every step).

    Args:
        max_steps: the run's last step, for the ETA.
        tokens_per_step: tokens in one optimizer step (batch size x sequence length).
        every_s: seconds between lines.
        label: put in front of every line (a sweep's trial name), or "".
        clock: time source, seconds (tests pass a fake one).
    """

    def __init__(self, max_steps: int, tokens_per_step: int, every_s: float = 20.0, label: str = "",
                 clock: Callable[[], float] = time.perf_counter):
        self.max_steps, self.tokens_per_step, self.every_s = max_steps, tokens_per_step, every_s
        self.prefix = f"{label} " if label else ""
        self.clock = clock
        self._start: tuple[float, int] | None = None
        self._last: tuple[float, int] | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        # a resumed run starts at its checkpoint's step: the rate and ETA count only the steps run here
        self._start = self._last = (self.clock(), trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now, step = self.clock(), trainer.global_step
        if self._last is None or now - self._last[0] < self.every_s or step == self._last[1]:
            return
        print(self.line(step, trainer.callback_metrics, now), flush=True)
        self._last = (now, step)

    def line(self, step: int, metrics: dict, now: float) -> str:
        """The progress line at `step`, given the trainer's latest metrics."""
        parts = [f"{self.prefix}step {step}/{self.max_steps}"]
        if "train/loss" in metrics:
            parts.append(f"loss {float(metrics['train/loss']):.4f}")
        parts += [f"{key} {float(value):.4f}" for key, value in sorted(metrics.items())
                  if key.startswith("val/") and value.numel() == 1]
        last_time, last_step = self._last
        if now > last_time:
            parts.append(f"{format_rate((step - last_step) * self.tokens_per_step / (now - last_time))} tok/s")
        start_time, start_step = self._start
        if step > start_step:
            per_step = (now - start_time) / (step - start_step)
            parts.append(f"eta {format_duration(per_step * (self.max_steps - step))}")
        return "  ".join(parts)
