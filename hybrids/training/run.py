"""`train(config)`: one tracked, checkpointed, resumable training run.

The run directory (runs/train/<name>/) holds the resolved config, the layout, csv/version_N/metrics.csv
(one per attempt), checkpoints
(last.ckpt and best.ckpt), data.json for a mixture of corpora (hybrids.training.corpus) and, if the run
stopped early, stopped.json. Running the same config again
resumes from last.ckpt: same data order (batches are a function of the step) and the same loss curve.
A broken last.ckpt is set aside and the run resumes from the newest intact checkpoint (see files.py).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf

from blocks import ConfigError
from hybrids.training.config import TrainConfig, compose, differences, flatten, run_name, scored, to_dict, to_yaml
from hybrids.training.data import MixedTask, make_task
from hybrids.training.files import check_writable, local_path, resume_checkpoint
from hybrids.training.forgetting import ForgettingCallback
from hybrids.training.module import LitHybrid
from hybrids.training.progress import ProgressLines, use_bar
from hybrids.training.schedules import Schedule, build_schedule
from hybrids.training.strategy import make_strategy
from hybrids.training.tracking import mlflow_logger, record_stop

log = logging.getLogger("hybrids")


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, float]
    steps: int
    stop_reason: str | None = None
    mlflow_run_id: str | None = None
    resumed_from: str | None = None
    extra: dict = field(default_factory=dict)


def _precision(config: TrainConfig) -> str:
    if config.trainer.precision != "auto":
        return config.trainer.precision
    return "bf16-mixed" if torch.cuda.is_available() and config.trainer.accelerator != "cpu" else "32-true"


def check_devices(config: TrainConfig) -> None:
    """This machine must have the `trainer.devices` a run asks for (GPUs; CPU cores for CPU processes).

    Raises:
        ConfigError: one line naming what the machine has, before anything is written.
    """
    t = config.trainer
    gpus = torch.cuda.device_count()
    if t.accelerator in ("gpu", "cuda") or (t.accelerator == "auto" and gpus):
        have, what = gpus, "CUDA GPU(s)"
    elif t.accelerator == "mps":
        have, what = int(torch.backends.mps.is_available()), "MPS device(s)"
    else:
        have, what = os.cpu_count() or 1, "CPU core(s) (one process each)"
    if t.strategy == "fsdp" and what != "CUDA GPU(s)":
        raise ConfigError("trainer.strategy=fsdp needs CUDA GPUs (Lightning's FSDP runs on GPUs only); "
                          "use trainer.strategy=ddp on CPU")
    if t.devices > have:
        raise ConfigError(f"trainer.devices = {t.devices} but this machine has {have} {what}; "
                          f"set trainer.devices={max(have, 1)} or fewer")


def check_vocab(config: TrainConfig, task) -> None:
    """The model's vocabulary must hold every token id the task generates."""
    if config.model.vocab_size < task.vocab_size:
        raise ConfigError(f"model.vocab_size = {config.model.vocab_size} is smaller than the task's vocabulary "
                          f"({task.vocab_size}); set model.vocab_size={task.vocab_size}")


def prepare(config: TrainConfig) -> tuple[LitHybrid, Path]:
    """Build the data, schedule and module for `config`; checks that model and task fit together."""
    reset = config.data.reset_at_boundaries
    task = make_task(config.task, reset)
    check_vocab(config, task)
    schedule = build_schedule(config.schedule, config.trainer.max_steps,
                              tokens_per_step=config.trainer.batch_size * task.seq_len)
    if config.phase2_task is not None:
        task = MixedTask(task, make_task(config.phase2_task, reset), schedule)
    run_dir = Path(config.run.dir) / run_name(config)
    return LitHybrid(config, task, schedule), run_dir


def train(config: TrainConfig | list[str], callbacks: list | None = None) -> TrainResult:
    """Train (or resume) the run described by `config` (`hybrids.train`).

    Args:
        config: a TrainConfig, or Hydra overrides of recipes/train.yaml as `hybrids train` takes them,
            e.g. ["model=llama-tiny", "task=mqar", "trainer.max_steps=20"].
        callbacks: extra Lightning callbacks (sweeps add pruning).
    Returns:
        The run's directory, its last logged metrics, the step reached and why it stopped early, if it did.
    Raises:
        ConfigError: overrides or a config that do not validate, a model whose vocabulary the task exceeds.
    """
    if isinstance(config, str):
        raise ConfigError(f"train takes a TrainConfig or a list of overrides, got the string {config!r}")
    if not isinstance(config, TrainConfig):
        config = compose(list(config))
    L.seed_everything(config.trainer.seed, verbose=False)
    check_devices(config)
    module, run_dir = prepare(config)
    _check_same_run(run_dir, config)
    ckpt_dir = run_dir / "checkpoints"
    check_writable(run_dir, "run folder")
    if config.tracking.enabled:
        if (store := local_path(config.tracking.uri)) is not None:
            check_writable(store, "MLflow store")
        check_writable(config.tracking.artifacts, "MLflow artifact folder")
    resume = resume_checkpoint(ckpt_dir) if config.run.resume and ckpt_dir.is_dir() else None
    resumed_from = str(resume) if resume else None
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(config))
    (run_dir / "layout.txt").write_text(module.model.layout.describe() + "\n")
    if hasattr(module.task, "record"):  # a mixture of corpora: each source, its weight and realised share
        (run_dir / "data.json").write_text(json.dumps(module.task.record(), indent=1) + "\n")
    log.info("layout %s (%d layers, %d shared invocations)", module.model.layout, module.model.layout.n_layers,
             len(module.model.layout.invocations))

    loggers = [CSVLogger(run_dir, name="csv")]  # csv/version_N/metrics.csv: one per attempt, none overwritten
    mlflow = mlflow_logger(config, run_dir) if config.tracking.enabled else None
    if mlflow is not None:
        loggers.append(mlflow)
    last = ModelCheckpoint(dirpath=ckpt_dir, filename="step{step:06d}", every_n_train_steps=config.trainer.ckpt_every,
                           save_top_k=1, save_last=True, auto_insert_metric_name=False)
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/loss", mode="min", save_top_k=1,
                           enable_version_counter=False)
    bar = module.prog_bar = use_bar(config.trainer.progress_bar)
    progress = [] if bar else [ProgressLines(config.trainer.max_steps, config.trainer.batch_size * module.task.seq_len,
                                             config.trainer.progress_every_s, label=config.run.name or "")]
    extra = [*forgetting_callbacks(module.schedule), *(callbacks or [])]
    trainer = L.Trainer(
        max_steps=config.trainer.max_steps, val_check_interval=config.trainer.val_every, check_val_every_n_epoch=None,
        limit_val_batches=config.trainer.val_batches, num_sanity_val_steps=0,
        gradient_clip_val=(config.optim.grad_clip or None) if config.trainer.strategy != "fsdp" else None,
        precision=_precision(config),
        accelerator=config.trainer.accelerator, devices=config.trainer.devices,
        strategy=make_strategy(config.trainer, module.model),
        num_nodes=config.trainer.num_nodes, use_distributed_sampler=False, logger=loggers,
        callbacks=[last, best, *progress, *extra], log_every_n_steps=config.trainer.log_every,
        enable_progress_bar=bar, enable_model_summary=False, default_root_dir=run_dir,
    )
    if mlflow is not None and not resumed_from:
        _log_run_inputs(mlflow, config, module, run_dir)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*IterableDataset.*__len__.*")
        trainer.fit(module, ckpt_path=resumed_from)
        if module.stop_reason is None and not any(k.startswith("val/") for k in trainer.callback_metrics):
            # resumed at max_steps (killed after its last checkpoint): nothing ran, so score the weights now;
            # not under FSDP, where validate() would meet the root unit's flat shard (its logs have the last scores)
            if config.trainer.strategy == "fsdp":
                log.warning("resumed at max_steps under FSDP: not validated again (see the run's logged val/ metrics)")
            else:
                trainer.validate(module, verbose=False)
    if module.stop_reason:
        record_stop(run_dir, module.stop_reason, mlflow)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    return TrainResult(run_dir, metrics, trainer.global_step, module.stop_reason,
                       mlflow.run_id if mlflow is not None else None, resumed_from)


def forgetting_callbacks(schedule: Schedule) -> list[ForgettingCallback]:
    """A ForgettingCallback for a schedule with a phase 2 (two_phase), none for the others."""
    start = schedule.phase2_start_step
    return [] if start is None else [ForgettingCallback(start)]


def _check_same_run(run_dir: Path, config: TrainConfig) -> None:
    """A run folder belongs to one config: never resume (or overwrite) another config's checkpoints in it.
    Only `trainer.max_steps` may change, to continue a run for longer (said in one line).

    Raises:
        ConfigError: when the folder holds checkpoints of a run with other settings.
    """
    stored = run_dir / "config.yaml"
    if not stored.is_file() or not any((run_dir / "checkpoints").glob("*.ckpt")):
        return
    old = flatten(scored(OmegaConf.to_container(OmegaConf.load(stored))))  # OmegaConf reads its own YAML back
    new = flatten(scored(to_dict(config)))
    steps = "trainer.max_steps"
    if {k: v for k, v in old.items() if k != steps} != {k: v for k, v in new.items() if k != steps}:
        raise ConfigError(f"{run_dir} holds a run with other settings ({differences(old, new)}); "
                          f"choose another run.name (or leave it unset: the name then follows the config)")
    if old.get(steps) != new[steps]:
        print(f"hybrids: continuing {run_dir} with {steps} {old.get(steps)} -> {new[steps]}", file=sys.stderr)


def _log_run_inputs(mlflow, config: TrainConfig, module: LitHybrid, run_dir: Path) -> None:
    """Params: the resolved config, the layout and the model's accounting; the config file as artifact."""
    from hybrids.accounting import stats

    params = flatten(to_dict(config))
    params["layout.resolved"] = str(module.model.layout)
    params.update({f"stats.{k}": v for k, v in stats(module.model, seq_len=module.task.seq_len).to_dict().items()
                   if isinstance(v, int | float | str)})
    mlflow.log_hyperparams(params)
    mlflow.experiment.log_artifact(mlflow.run_id, str(run_dir / "config.yaml"))
    mlflow.experiment.log_artifact(mlflow.run_id, str(run_dir / "layout.txt"))
    mlflow.experiment.set_tag(mlflow.run_id, "layout", str(module.model.layout))
    if hasattr(module.task, "record"):
        mlflow.experiment.log_artifact(mlflow.run_id, str(run_dir / "data.json"))
        mlflow.experiment.set_tag(mlflow.run_id, "data.mixture", module.task.describe())
