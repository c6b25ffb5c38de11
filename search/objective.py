"""The objective of a study: one trial = one training run of the composed config.

Every finished trial keeps its value, resolved config, layout, accounting and MLflow run id as user
attrs. A retried trial uses the run directory (and so the checkpoint) of the trial it retries.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import optuna

from blocks import ConfigError
from hybrids.layout import parse_layout
from search.identity import StudyIdentity
from search.protocol import NOT_ARM, SEED, budget, match_keywords
from search.storage import Heartbeat, origin
from search.study_config import NAMED, Param, StudyConfig


class TrialInterrupted(Exception):
    """Ctrl-C or SIGTERM during a trial. Lightning turns both into SystemExit, which Optuna would not
    catch (the trial would stay RUNNING); as an Exception it is recorded as a failed trial."""


def suggest(trial: optuna.Trial, name: str, p: Param) -> Any:
    if p.type == "categorical":
        return trial.suggest_categorical(name, p.choices)
    if p.type == "int":
        return trial.suggest_int(name, int(p.low), int(p.high), log=p.log)
    return trial.suggest_float(name, p.low, p.high, log=p.log)


def override(key: str, value: Any) -> str:
    """A Hydra override setting key to value whether or not the recipe has the key ("++"), so that a
    study can vary any block option; strings are quoted (layouts hold ':', '*', '(' ...)."""
    if isinstance(value, bool):
        return f"++{key}={str(value).lower()}"
    if isinstance(value, str):
        return f"++{key}='{value}'"
    return f"++{key}={value}"


def group_label(params: dict[str, Any]) -> str:
    """The configuration without its seed, e.g. "model.layout=2M:A*, optim.lr=0.003"."""
    return ", ".join(f"{k}={v}" for k, v in params.items() if k != SEED) or "default"


def arm_label(params: dict[str, Any]) -> str:
    """The arm: the configuration without seed, learning rate and weight decay, e.g. "model.layout=2M:A*"."""
    return ", ".join(f"{k}={v}" for k, v in params.items() if k not in NOT_ARM) or "default"


class Objective:
    def __init__(self, config: StudyConfig, identity: StudyIdentity, extra_train: list[str],
                 parent_run_id: str | None):
        self.config, self.identity = config, identity
        self.extra_train, self.parent_run_id = extra_train, parent_run_id
        self._width_cache: dict[str, int] = {}

    def overrides(self, params: dict[str, Any], number: int) -> list[str]:
        c = self.config
        out = [*c.train, *self.extra_train]
        for key, value in params.items():
            out += c.variants[value] if key in NAMED else [override(key, value)]
        # the study's uid in the folder: a same-named study elsewhere never finds (or overwrites) these checkpoints
        out += [f"run.dir={c.runs_dir}/{self.identity.key}", f"run.name=trial-{number:04d}",
                "trainer.progress_bar=false",
                *([f"tracking.uri={c.tracking_uri}", f"tracking.artifacts={c.artifacts}"] if c.tracked
                  else ["tracking.enabled=false"]),
                f"tracking.experiment=study-{c.name}", override("tracking.run_name", f"trial {number}: "
                                                                 f"{group_label(params)}")]
        if self.parent_run_id:
            out.append(f"tracking.parent_run_id={self.parent_run_id}")
        if c.match:
            out.append(f"model.d_model={self._matched_width(out)}")
        return out

    @functools.cached_property
    def match_target(self) -> tuple[int, int]:
        """The reference's budget (what `match.by` names) and the sequence length it is counted at."""
        from hybrids.accounting import stats
        from hybrids.training.config import compose

        match = self.config.matching
        reference = compose([*self.config.train, *self.extra_train, *match.reference])
        seq_len = int(reference.task.get("seq_len", 256))
        return budget(stats(reference.model, seq_len=seq_len), match.by), seq_len

    def _matched_width(self, overrides: list[str]) -> int:
        """d_model giving this trial's model the reference's budget."""
        from hybrids.accounting import match_width
        from hybrids.training.config import compose

        match = self.config.matching
        target, seq_len = self.match_target
        model = compose(overrides).model
        key = json.dumps({**model.to_dict(), "d_model": None}, sort_keys=True, default=str)
        if key not in self._width_cache:
            self._width_cache[key] = match_width(model, seq_len=seq_len, multiple_of=match.multiple_of,
                                                 **match_keywords(match.by, target))
        return self._width_cache[key]

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            return self._run(trial)
        except (KeyboardInterrupt, SystemExit):
            # also during set-up (compose, accounting, data), before Lightning handles the signal itself
            raise TrialInterrupted(f"trial {trial.number} interrupted") from None

    def _run(self, trial: optuna.Trial) -> float:
        from hybrids.accounting import stats
        from hybrids.training.config import compose, to_yaml
        from hybrids.training.run import train

        c = self.config
        params = {name: suggest(trial, name, p) for name, p in c.space.items()}
        number = origin(trial.study, trial)
        config = compose(self.overrides(params, number))
        s = stats(config.model, seq_len=int(config.task.get("seq_len", 256)))
        layout = parse_layout(s.layout)
        n_attention = s.n_invocations + sum(1 for item in layout.items if getattr(item, "mixer", None) == "A")
        attrs = {"config_yaml": to_yaml(config), "layout": str(layout), "n_layers": s.n_layers,
                 "n_invocations": s.n_invocations, "n_attention": n_attention, "params_unique": s.params_unique,
                 "flops_per_token": s.flops_forward, "kv_bytes": s.kv_cache_bytes, "state_bytes": s.state_bytes,
                 "seed": config.trainer.seed, "group": group_label(params), "arm": arm_label(params),
                 "d_model": config.model.d_model}
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        retry = f"  retry of trial {number}" if number != trial.number else ""
        print(f"trial {trial.number:>3} start    {group_label(params)}  seed {config.trainer.seed}{retry}", flush=True)
        pruning = _pruning_callback(trial, c.metric) if c.pruner != "none" else None
        with Heartbeat(trial, c.heartbeat_interval):
            result = train(config, callbacks=[pruning] if pruning else None)
        trial.set_user_attr("run_dir", str(result.run_dir))
        trial.set_user_attr("mlflow_run_id", result.mlflow_run_id)
        trial.set_user_attr("resumed_from", result.resumed_from)  # a retry's checkpoint; None: started at step 0
        if pruning is not None:
            pruning.check_pruned()
        if c.eval and not result.stop_reason:
            result.metrics.update(evaluate_run(result, config, c.eval))
        trial.set_user_attr("metrics", {k: v for k, v in result.metrics.items() if math.isfinite(v)})
        if result.stop_reason:
            trial.set_user_attr("fail_reason", result.stop_reason)
            trial.set_user_attr("no_retry", True)  # a diverged run diverges again
            return float("nan")
        if c.metric not in result.metrics:
            raise ConfigError(f"metric {c.metric!r} was not logged; logged: {', '.join(sorted(result.metrics))}")
        return result.metrics[c.metric]


def evaluate_run(result, config, options: list[str]) -> dict[str, float]:
    """`hybrids eval` on a trial's finished run (on the device it trained on, logged into its MLflow run when it
    has one); its metrics."""
    import torch

    from hybrids.evaluation.runner import evaluate

    device = "cuda" if torch.cuda.is_available() and config.trainer.accelerator != "cpu" else "cpu"
    defaults = [f"run={result.run_dir}", f"device={device}", f"mlflow={str(bool(result.mlflow_run_id)).lower()}"]
    return evaluate([*defaults, *options])["metrics"]


def _pruning_callback(trial: optuna.Trial, metric: str):
    from optuna_integration import PyTorchLightningPruningCallback

    return PyTorchLightningPruningCallback(trial, monitor=metric)
