"""Evaluation of a trained model: `hybrids eval` (runner.py), our offline long-context probes reported against
cache bytes (probes.py), and the lm-evaluation-harness adapter (adapter.py, needs the `eval` extra)."""

from hybrids.evaluation.runner import EvalOptions, evaluate

__all__ = ["EvalOptions", "evaluate"]
