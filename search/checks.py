"""Checks of a whole study before any of its trials trains: its folders and stores can be written, every
trial's config composes, its layout resolves, its schedule fits, and the study's metric is one its task logs.

A trial that fails on its own config would otherwise surface only when a worker reaches it, maybe hours
into a sweep, and be retried to no avail.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from blocks import ConfigError
from hybrids.layout import LayoutError
from search.identity import StudyIdentity
from search.objective import Objective, group_label
from search.study_config import StudyConfig


def points(config: StudyConfig) -> list[dict[str, Any]]:
    """The parameter sets the study can give a trial: the grid's first n_trials points, or for other
    samplers every categorical combination with each range at its two ends."""
    if config.sampler == "grid":
        return config.grid()[: config.n_trials]
    keys = list(config.space)
    choices = [p.choices if p.type == "categorical" else sorted({p.low, p.high}) for p in config.space.values()]
    out = []
    for values in itertools.product(*choices):
        point = dict(zip(keys, values, strict=True))
        out.append({k: int(v) if config.space[k].type == "int" else v for k, v in point.items()})
    return out


def check_devices(devices: list[int] | None) -> None:
    """Every GPU index a study names exists on this machine (one line otherwise)."""
    if devices is None:
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(f"devices={devices} names GPUs, but this machine has no CUDA GPU; leave devices out")
    missing = sorted({d for d in devices if d >= count})
    if missing:
        raise ConfigError(f"devices={devices}: this machine has {count} GPU(s) (0..{count - 1}); no GPU {missing[0]}")


def check_study(config: StudyConfig, extra_train: list[str]) -> None:
    """Check the study's folders, then compose every trial's config and check it as training would.

    Raises:
        ConfigError: a read-only folder or store; or, naming the trial's parameters, what is wrong with its
            config (a bad layout, key or value, a schedule that does not fit, a metric the task does not log).
    """
    from hybrids.accounting import stats
    from hybrids.training.config import compose
    from hybrids.training.data import MixedTask, make_task
    from hybrids.training.files import check_writable, local_path
    from hybrids.training.forgetting import FORGETTING_METRICS
    from hybrids.training.module import logged_metrics
    from hybrids.training.run import check_vocab
    from hybrids.training.schedules import build_schedule

    check_devices(config.devices)
    if config.tracked and config.resolved_storage() == config.tracking_uri:
        raise ConfigError(f"storage and tracking_uri name the same database ({config.tracking_uri.split('@')[-1]}): "
                          "Optuna and MLflow each need their own (both keep an alembic_version table)")
    check_writable(config.runs_dir, "trial folder")
    stores = [(config.resolved_storage(), "study storage")]
    stores += [(config.tracking_uri, "MLflow store")] if config.tracked else []
    for url, what in stores:
        if (path := local_path(url)) is not None:
            check_writable(path, what)
    if config.tracked:
        check_writable(config.artifacts, "MLflow artifact folder")
    # trial folders are not created here: a stand-in identity only fills the run.dir override
    objective = Objective(config, StudyIdentity(config.name, 0, "check"), extra_train, parent_run_id=None)
    tasks: dict[str, Any] = {}
    metrics_of: dict[str, list[str]] = {}
    for point in points(config):
        where = f"study {config.name}, trial {group_label(point)}"
        try:
            trial = compose(objective.overrides(point, 0))
            stats(trial.model, seq_len=int(trial.task.get("seq_len", 256)))
            task_key = json.dumps(trial.task, sort_keys=True)
            task = tasks[task_key] = tasks.get(task_key) or make_task(trial.task)
            check_vocab(trial, task)
            schedule = build_schedule(trial.schedule, trial.trainer.max_steps,
                                      tokens_per_step=trial.trainer.batch_size * task.seq_len)
            two_phase = schedule.phase2_start_step is not None
            if trial.phase2_task is not None:  # as training builds it: the phase-2 data must fit the phase-1 task
                phase2_key = json.dumps(trial.phase2_task, sort_keys=True)
                tasks[phase2_key] = tasks.get(phase2_key) or make_task(trial.phase2_task)
                MixedTask(task, tasks[phase2_key], schedule)
            key = json.dumps([task_key, trial.trainer.batch_size, trial.trainer.val_batches, two_phase])
            if key not in metrics_of:
                metrics_of[key] = logged_metrics(task, trial.trainer.batch_size, trial.trainer.val_batches)
                metrics_of[key] += list(FORGETTING_METRICS) if two_phase else []
        except LayoutError as err:
            raise LayoutError(f"{where}: {err.reason}", err.text, err.pos) from None
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        if config.eval and config.metric.startswith(("probe/", "lm_eval/")):
            check_eval_metric(config.metric, config.eval)
        elif config.metric not in metrics_of[key]:
            val = [m for m in metrics_of[key] if m.startswith(("val/", "train/"))]
            raise ConfigError(f"{where}: metric {config.metric!r} is not logged by task "
                              f"{trial.task['name']!r}; it logs {', '.join(val)}")


def check_eval_metric(metric: str, options: list[str]) -> None:
    """A study metric from `eval` must name a probe (at one of its lengths) or an lm-eval task that eval runs.

    Raises:
        ConfigError: naming the metrics eval can give.
    """
    from hybrids.evaluation.probes import lengths
    from hybrids.evaluation.runner import parse_options

    opts = parse_options(["run=.", *options])
    probes, tasks = opts.task_list()
    given = [f"probe/{p}/{n}/accuracy" for p in probes for n in lengths(opts.min_len, opts.max_len)]
    given += [f"lm_eval/{t}/<metric>" for t in tasks]
    parts = metric.split("/")
    if parts[0] == "probe" and metric in given or parts[0] == "lm_eval" and len(parts) == 3 and parts[1] in tasks:
        return
    raise ConfigError(f"metric {metric!r} is not one eval gives; with eval={options} it gives {', '.join(given)}")
