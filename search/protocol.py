"""The fair-comparison protocol of a study: arms, budget matching and pruning within an arm.

An arm is one configuration of the study's space without its seed, learning rate and weight decay; it trains
at every value of the study's `lr_grid` (and `wd_grid`) and at every seed, and the report keeps its best
learning rate. Comparison studies match every arm's budget to a reference configuration's by adjusting
d_model: unique parameters, forward FLOPs per token, or cache bytes (recurrent state + KV cache) at the task's
sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from blocks import ConfigError

LR, WD, SEED = "optim.lr", "optim.weight_decay", "trainer.seed"
NOT_ARM = (LR, WD, SEED)  # the dimensions an arm is trained over, not defined by
MATCH_BY = ("params", "flops", "state")
MATCH_KEYS = ("by", "reference", "multiple_of")


@dataclass(frozen=True)
class Match:
    """Width matching: every arm's d_model is chosen so that its budget is closest to the reference's.

    Attributes:
        by: params | flops | state (KV cache + recurrent state bytes of one sequence at the task's seq_len).
        reference: Hydra overrides (added to the study's `train`) that give the reference configuration.
        multiple_of: d_model is a multiple of this (tiny models need a fine step to match within a few %).
    """

    by: str = "params"
    reference: tuple[str, ...] = ()
    multiple_of: int = 8


def parse_match(value: Any) -> Match | None:
    """A study's `match` field as a Match; None for an omitted field or `match: none`.

    Raises:
        ConfigError: an unknown key, `by` or a non-positive multiple_of.
    """
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        return None
    if isinstance(value, Match):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"match must be none or {{by: params|flops|state, reference: [overrides]}}, got {value!r}")
    unknown = set(value) - set(MATCH_KEYS)
    if unknown:
        raise ConfigError(f"unknown match key(s) {', '.join(sorted(unknown))}; valid: {', '.join(MATCH_KEYS)}")
    by = value.get("by", "params")
    if by not in MATCH_BY:
        raise ConfigError(f"match.by must be {', '.join(MATCH_BY)}, got {by!r}")
    reference = value.get("reference") or []
    if isinstance(reference, str) or not all(isinstance(r, str) for r in reference):
        raise ConfigError(f"match.reference must be a list of overrides, got {reference!r}")
    multiple_of = value.get("multiple_of", 8)
    if not isinstance(multiple_of, int) or multiple_of <= 0:
        raise ConfigError(f"match.multiple_of must be a positive integer, got {multiple_of!r}")
    return Match(by, tuple(reference), multiple_of)


def check_grid(name: str, values: Any, positive: bool) -> list[float] | None:
    """A learning-rate (positive) or weight-decay (non-negative) grid as floats; None when not given.

    Raises:
        ConfigError: an empty grid, a value that is not a number, or one out of range.
    """
    if values is None:
        return None
    if not isinstance(values, list | tuple) or not values:
        raise ConfigError(f"{name} must be a non-empty list of numbers, e.g. [1e-3, 3e-3, 1e-2]; got {values!r}")
    numbers = [_number(v) for v in values]
    bad = [v for v, n in zip(values, numbers, strict=True) if n is None or (n <= 0 if positive else n < 0)]
    if bad:
        rule = "positive" if positive else "non-negative"
        raise ConfigError(f"{name} values must be {rule} numbers; got {bad[0]!r} in {list(values)}")
    if len(set(numbers)) != len(numbers):
        raise ConfigError(f"{name} lists a value twice: {list(values)}")
    return sorted(numbers)


def _number(value: Any) -> float | None:
    """A float from a number or from text such as "1e-3" (YAML 1.1 reads 1e-3 without a dot as a string)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def budget(stats, by: str) -> int:
    """The budget of a model's `hybrids.accounting.Stats` that `match.by` names."""
    return {"params": stats.params_unique, "flops": stats.flops_forward, "state": stats.cache_bytes}[by]


def match_keywords(by: str, target: int) -> dict[str, int]:
    """`hybrids.accounting.match_width` keywords for a budget."""
    return {{"params": "target_params", "flops": "target_flops", "state": "target_cache_bytes"}[by]: target}


def arm_of(params: dict[str, Any], arm_by: list[str]) -> tuple:
    return tuple(str(params.get(k)) for k in arm_by)


class ArmMedianPruner(optuna.pruners.BasePruner):
    """Optuna's median rule within an arm: a trial is pruned when its intermediate value at a step is worse
    than the median of the finished trials of its own arm (other learning rates and seeds) at that step.

    Optuna's MedianPruner compares a trial with every trial of the study, so in a comparison study it would
    prune the weaker arms (the very values the study measures); within an arm it prunes only the learning
    rates that are clearly worse than the arm's others.

    Args:
        arm_by: the params that define an arm (the space without seed, lr and weight decay).
        maximize: the study's direction.
        n_startup_trials: finished trials of the arm needed before any of its trials is pruned.
        n_warmup_steps: steps before which no trial is pruned.
    """

    def __init__(self, arm_by: list[str], maximize: bool, n_startup_trials: int = 2, n_warmup_steps: int = 0):
        self.arm_by, self.maximize = list(arm_by), maximize
        self.n_startup_trials, self.n_warmup_steps = n_startup_trials, n_warmup_steps

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < self.n_warmup_steps:
            return False
        value = trial.intermediate_values[step]
        arm = arm_of(trial.params, self.arm_by)
        peers = [t.intermediate_values[step] for t in study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
            if step in t.intermediate_values and arm_of(t.params, self.arm_by) == arm]
        if len(peers) < self.n_startup_trials:
            return False
        if not np.isfinite(value):
            return True
        median = float(np.median(peers))
        return value < median if self.maximize else value > median
