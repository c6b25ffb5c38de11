"""Learning-rate and data-mix schedules: cosine, WSD, constant, linear, step and exponential decay, and Zamba's
two-phase schedule.

A `Schedule` maps the 0-based optimizer step to a multiplier of the peak LR (`lr_factor`) and to the share
of each batch drawn from phase-2 data (`phase2_fraction`). Notation: T = total_steps, W = warmup_steps, the
last step is T - 1.

- Warmup (every schedule): lr_factor(s) = (s + 1) / W for s < W. The first step already trains and step W - 1
  reaches the peak; the shape after warmup starts at its own value at step W (1.0 for all but phase 2).
- A decay from value hi at step a to value lo at step b (b >= a) has progress p = (s - a) / (b - a), p = 1 when
  a == b, and value
      linear: hi + (lo - hi) * p
      cosine: lo + (hi - lo) * (1 + cos(pi * p)) / 2
      exp:    hi * (lo / hi) ** p   (geometric interpolation; needs lo > 0)
- cosine:    warmup, then a cosine decay from 1.0 at step W to min_lr_ratio at step T - 1.
- wsd:       warmup, 1.0 (stable), then the last D = round(decay_fraction * T) steps decay with decay_shape from
             1.0 at step T - D to min_lr_ratio at step T - 1 (D = 0: no decay).
- constant:  warmup, then 1.0.
- linear:    warmup, then a linear decay from 1.0 at step W to min_lr_ratio at step T - 1.
- exp:       warmup, then an exp decay from 1.0 at step W to min_lr_ratio at step T - 1 (needs min_lr_ratio > 0).
- step:      warmup, then the steps [W, T) split into n = step_drops + 1 equal stages; stage k (0-based,
             k = floor((s - W) * n / (T - W))) holds min_lr_ratio ** (k / step_drops): 1.0 in the first stage,
             min_lr_ratio in the last, equal factors between.
- two_phase: phase 1 = steps [0, P), phase 2 = steps [P, T), where P = round(phase2_start * T) if
             phase2_start < 1, else ceil(phase2_start / tokens_per_step) (the first step that starts at or after
             that many tokens). Phase 1: warmup, then 1.0 (phase1_shape "constant") or a cosine decay from 1.0 at
             step W to phase1_min_ratio at step P - 1. Phase 2: a linear re-warm from the phase-1 end value
             e1 = lr_factor(P - 1) at step P to rewarm_ratio at step P + R (R = rewarm_steps), then an anneal
             with decay_shape from rewarm_ratio at step P + R to min_lr_ratio at step T - 1. Step P repeats e1, so
             the curve is continuous across the phase boundary; with R = 0 it jumps to rewarm_ratio at step P.
             phase2_fraction is 1 - replay_fraction in phase 2 (the rest of each batch replays phase-1 data).

Equal tokens: every schedule spans the same total_steps, so a two-phase run and a cosine, WSD or constant run
with the same total_steps and batch see the same number of tokens. Phase 2 is carved out of that budget, not
added to it, which is what makes the comparison fair.

Steps past the end hold the last step's values (a scheduler may be stepped once after the final update).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from blocks import ConfigError

SCHEDULES = ("cosine", "wsd", "constant", "linear", "step", "exp", "two_phase")
DECAY_SHAPES = ("linear", "cosine", "exp")
PHASE1_SHAPES = ("constant", "cosine")
_FRACTIONS = ("min_lr_ratio", "decay_fraction", "phase1_min_ratio", "replay_fraction")


# The fields each schedule reads besides name and warmup_steps: a field its schedule never reads is no setting of a run
SCHEDULE_FIELDS = {
    "constant": (), "cosine": ("min_lr_ratio",), "linear": ("min_lr_ratio",), "exp": ("min_lr_ratio",),
    "step": ("min_lr_ratio", "step_drops"), "wsd": ("min_lr_ratio", "decay_fraction", "decay_shape"),
    "two_phase": ("min_lr_ratio", "decay_shape", "phase1_shape", "phase1_min_ratio", "phase2_start", "rewarm_steps",
                  "rewarm_ratio", "replay_fraction"),
}


@dataclass
class ScheduleConfig:
    """An LR and data-mix schedule; the module docstring gives the exact formulas.

    name: cosine | wsd | constant | linear | step | exp | two_phase. warmup_steps: linear warmup, (s + 1) /
    warmup_steps at step s.
    min_lr_ratio: the final LR as a fraction of the peak. decay_fraction: wsd decays over this last fraction of
    steps. decay_shape: linear | cosine | exp, for wsd's decay and the two-phase anneal. phase1_shape: constant |
    cosine, the two-phase schedule's shape after warmup in phase 1 (cosine ends at phase1_min_ratio on the last
    phase-1 step). phase2_start: a fraction of total steps if < 1, else a token count. rewarm_steps, rewarm_ratio:
    the linear re-warm at the start of phase 2, to rewarm_ratio * peak (above 1 re-warms past the phase-1 peak).
    replay_fraction: the share of each phase-2 batch drawn from phase-1 data. step_drops: the number of drops of
    the step schedule (each by the same factor, min_lr_ratio ** (1 / step_drops)).
    """

    name: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    decay_shape: str = "linear"
    phase1_shape: str = "cosine"
    phase1_min_ratio: float = 0.1
    phase2_start: float = 0.8
    rewarm_steps: int = 10
    rewarm_ratio: float = 0.5
    replay_fraction: float = 0.3
    step_drops: int = 2

    def __post_init__(self) -> None:
        _check_choice("name", self.name, SCHEDULES)
        _check_choice("decay_shape", self.decay_shape, DECAY_SHAPES)
        _check_choice("phase1_shape", self.phase1_shape, PHASE1_SHAPES)
        for key in _FRACTIONS:
            value = getattr(self, key)
            if not _is_real(value) or not 0 <= value <= 1:
                raise ConfigError(f"schedule.{key} must be a number in [0, 1], got {value!r}")
        if not _is_int(self.step_drops) or self.step_drops < 1:
            raise ConfigError(f"schedule.step_drops must be an integer >= 1, got {self.step_drops!r}")
        if self.name == "exp" and self.min_lr_ratio == 0:
            raise ConfigError("schedule.min_lr_ratio must be > 0 with the exp schedule (a geometric decay cannot "
                              "reach 0); use 'linear' to decay to 0")
        for key in ("warmup_steps", "rewarm_steps"):
            value = getattr(self, key)
            if not _is_int(value) or value < 0:
                raise ConfigError(f"schedule.{key} must be an integer >= 0, got {value!r}")
        if not _is_real(self.phase2_start) or self.phase2_start < 0:
            raise ConfigError(f"schedule.phase2_start must be a fraction in [0, 1) or a token count >= 1, "
                              f"got {self.phase2_start!r}")
        if not _is_real(self.rewarm_ratio) or self.rewarm_ratio < 0:
            raise ConfigError(f"schedule.rewarm_ratio must be a finite number >= 0, got {self.rewarm_ratio!r}")
        if self.name == "two_phase" and self.rewarm_ratio < self.min_lr_ratio:
            raise ConfigError(f"schedule.rewarm_ratio must be >= schedule.min_lr_ratio = {self.min_lr_ratio} "
                              f"(phase 2 anneals down to it), got {self.rewarm_ratio}")
        if self.name in ("wsd", "two_phase") and self.decay_shape == "exp" and self.min_lr_ratio == 0:
            raise ConfigError("schedule.min_lr_ratio must be > 0 with decay_shape 'exp' (a geometric decay cannot "
                              "reach 0); use 'linear' or 'cosine' to decay to 0")


@dataclass
class Schedule:
    """A validated schedule over `total_steps` optimizer steps; build it with `build_schedule`.

    Attributes:
        phase2_start_step: the first phase-2 step of a two-phase schedule, None for the others.
    """

    config: ScheduleConfig
    total_steps: int
    tokens_per_step: int = 1
    phase2_start_step: int | None = field(init=False, default=None)
    _decay_start: int = field(init=False, repr=False, default=0)
    _anneal_start: int = field(init=False, repr=False, default=0)
    _phase1_end: float = field(init=False, repr=False, default=1.0)

    def __post_init__(self) -> None:
        c, T = self.config, self.total_steps
        if not _is_int(T) or T < 1:
            raise ConfigError(f"total_steps must be an integer >= 1, got {T!r}")
        if not _is_int(self.tokens_per_step) or self.tokens_per_step < 1:
            raise ConfigError(f"tokens_per_step must be an integer >= 1, got {self.tokens_per_step!r}")
        if c.warmup_steps > T - 1:
            raise ConfigError(f"schedule.warmup_steps must be in [0, {T - 1}] (total_steps = {T}), "
                              f"got {c.warmup_steps}")
        if c.name == "wsd":
            n_decay = _round(c.decay_fraction * T)
            if c.warmup_steps + n_decay > T:
                raise ConfigError(f"schedule.decay_fraction = {c.decay_fraction} decays the last {n_decay} of "
                                  f"{T} steps, overlapping the {c.warmup_steps} warmup steps; need decay_fraction <= "
                                  f"{(T - c.warmup_steps) / T:.4g}")
            self._decay_start = T - n_decay
        elif c.name == "step" and T - c.warmup_steps < c.step_drops + 1:
            raise ConfigError(f"schedule.step_drops = {c.step_drops} needs at least {c.step_drops + 1} steps after "
                              f"the {c.warmup_steps} warmup steps (total_steps = {T})")
        elif c.name == "two_phase":
            start = self._phase2_step()
            low = max(1, c.warmup_steps)
            if not low <= start <= T - 1:
                raise ConfigError(f"schedule.phase2_start = {c.phase2_start} puts phase 2 at step {start} "
                                  f"(total_steps = {T}, tokens_per_step = {self.tokens_per_step}); it must start in "
                                  f"[{low}, {T - 1}], after warmup and 1+ phase-1 steps, before the last step")
            longest = max(0, T - 2 - start)
            if c.rewarm_steps > longest:
                raise ConfigError(f"schedule.rewarm_steps must be in [0, {longest}]: phase 2 has {T - start} "
                                  f"steps and needs at least one anneal step after the re-warm, got {c.rewarm_steps}")
            self.phase2_start_step = start
            self._anneal_start = start + c.rewarm_steps
            self._phase1_end = self._phase1(start - 1)

    def lr_factor(self, step: int) -> float:
        """The multiplier of the peak LR at optimizer step `step` (0-based); never negative."""
        s, c = self._clamp(step), self.config
        if c.name == "constant":
            return _warmup(s, c.warmup_steps) if s < c.warmup_steps else 1.0
        if c.name in ("cosine", "linear", "exp"):
            if s < c.warmup_steps:
                return _warmup(s, c.warmup_steps)
            return _decay(1.0, c.min_lr_ratio, _progress(s, c.warmup_steps, self.total_steps - 1), c.name)
        if c.name == "step":
            if s < c.warmup_steps:
                return _warmup(s, c.warmup_steps)
            stage = min((s - c.warmup_steps) * (c.step_drops + 1) // (self.total_steps - c.warmup_steps), c.step_drops)
            return c.min_lr_ratio ** (stage / c.step_drops)
        if c.name == "wsd":
            if s < c.warmup_steps:
                return _warmup(s, c.warmup_steps)
            if s < self._decay_start:
                return 1.0
            return _decay(1.0, c.min_lr_ratio, _progress(s, self._decay_start, self.total_steps - 1), c.decay_shape)
        start = self.phase2_start_step
        if s < start:
            return self._phase1(s)
        if s < self._anneal_start:
            return self._phase1_end + (c.rewarm_ratio - self._phase1_end) * (s - start) / c.rewarm_steps
        return _decay(c.rewarm_ratio, c.min_lr_ratio, _progress(s, self._anneal_start, self.total_steps - 1),
                      c.decay_shape)

    def phase(self, step: int) -> int:
        """1 or 2: the data phase of step `step`; always 1 for schedules other than two_phase."""
        s = self._clamp(step)
        return 2 if self.phase2_start_step is not None and s >= self.phase2_start_step else 1

    def phase2_fraction(self, step: int) -> float:
        """The share of the batch at step `step` drawn from phase-2 data: 1 - replay_fraction in phase 2, else 0."""
        return 1.0 - self.config.replay_fraction if self.phase(step) == 2 else 0.0

    def curve(self, n_points: int | None = None) -> list[tuple[int, float, float]]:
        """(step, lr_factor, phase2_fraction) rows for plotting and logging.

        Args:
            n_points: None for every step; else this many evenly spaced steps from 0 to the last, plus the
                breakpoints (warmup end, decay start, phase boundary, re-warm peak) so that no corner is lost.
        Returns:
            Rows sorted by step, without duplicates.
        """
        T = self.total_steps
        if n_points is None or n_points >= T:
            steps = set(range(T))
        elif n_points < 2:
            raise ValueError(f"n_points must be >= 2 or None, got {n_points}")
        else:
            # round(i * (T - 1) / (n_points - 1)) in integers
            steps = {(2 * i * (T - 1) + n_points - 1) // (2 * (n_points - 1)) for i in range(n_points)}
            steps |= {b for b in self._breakpoints() if 0 <= b < T}
        return [(s, self.lr_factor(s), self.phase2_fraction(s)) for s in sorted(steps)]

    def lambda_lr(self, optimizer: Optimizer) -> LambdaLR:
        """A LambdaLR that sets every param group's LR to its initial LR times `lr_factor(step)`.

        Step it once per optimizer step (Lightning: interval "step"); it starts at step 0.
        """
        return LambdaLR(optimizer, self.lr_factor)

    def _phase2_step(self) -> int:
        c = self.config
        if c.phase2_start < 1:
            return _round(c.phase2_start * self.total_steps)
        return math.ceil(c.phase2_start / self.tokens_per_step)

    def _phase1(self, s: int) -> float:
        c = self.config
        if s < c.warmup_steps:
            return _warmup(s, c.warmup_steps)
        if c.phase1_shape == "constant":
            return 1.0
        return _decay(1.0, c.phase1_min_ratio, _progress(s, c.warmup_steps, self.phase2_start_step - 1), "cosine")

    def _breakpoints(self) -> set[int]:
        c = self.config
        points = {c.warmup_steps - 1, c.warmup_steps}
        if c.name == "wsd":
            points |= {self._decay_start - 1, self._decay_start}
        if c.name == "step":
            span = self.total_steps - c.warmup_steps
            starts = {c.warmup_steps + -(-k * span // (c.step_drops + 1)) for k in range(1, c.step_drops + 1)}
            points |= starts | {b - 1 for b in starts}
        if c.name == "two_phase":
            points |= {self.phase2_start_step - 1, self.phase2_start_step, self._anneal_start}
        return points

    def _clamp(self, step: int) -> int:
        try:
            step = operator.index(step)  # numpy and torch integers too
        except TypeError:
            raise ValueError(f"step must be an integer >= 0, got {step!r}") from None
        if step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step}")
        return min(step, self.total_steps - 1)


def build_schedule(config: ScheduleConfig, total_steps: int, tokens_per_step: int = 1) -> Schedule:
    """The schedule of `config` over `total_steps` optimizer steps.

    Args:
        config: the schedule's config (validated on construction).
        total_steps: optimizer steps in the run; every schedule spans all of them (equal tokens).
        tokens_per_step: tokens per optimizer step, to place a phase2_start given as a token count.
    Returns:
        The schedule.
    Raises:
        ConfigError: one line naming the field that cannot work with this run (warmup beyond the end, a wsd decay
            overlapping the warmup, phase 2 outside the run, a re-warm longer than phase 2, ...).
    """
    return Schedule(config, total_steps, tokens_per_step)


def _warmup(s: int, warmup_steps: int) -> float:
    return (s + 1) / warmup_steps


def _progress(s: int, start: int, end: int) -> float:
    return 1.0 if end <= start else (s - start) / (end - start)


def _decay(hi: float, lo: float, p: float, shape: str) -> float:
    # the end points are returned exactly so that "last step == min_lr_ratio" holds bit for bit
    if p <= 0:
        return hi
    if p >= 1:
        return lo
    if shape == "linear":
        return hi + (lo - hi) * p
    if shape == "cosine":
        return lo + (hi - lo) * 0.5 * (1.0 + math.cos(math.pi * p))
    return hi * (lo / hi) ** p


def _round(x: float) -> int:
    return math.floor(x + 0.5)  # half up, unlike round()'s half to even


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_choice(key: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown schedule.{key} {value!r}; valid: {', '.join(choices)}")
