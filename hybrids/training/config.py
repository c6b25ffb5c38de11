"""The training config: a Hydra config tree (recipes/train.yaml and its groups) checked against typed
dataclasses. Precedence: schema defaults < recipes/train.yaml and the chosen groups < command line.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from blocks import ConfigError
from hybrids.config import ModelConfig
from hybrids.training.schedules import ScheduleConfig

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "64-true")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")  # what Lightning's Trainer accepts on one device
STRATEGIES = ("auto", "ddp", "fsdp")  # Lightning's names: auto = one device, else DDP
DDP_COMMS = ("fp32", "bf16")  # the gradients' all-reduce precision under DDP
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01  # weight of the MoE load-balancing loss

    def __post_init__(self) -> None:
        if not _number(self.lr) or self.lr <= 0:
            raise ConfigError(f"optim.lr must be a number > 0, got {self.lr!r}")
        if len(self.betas) != 2 or not all(_number(b) and 0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)!r}")
        for key in ("weight_decay", "grad_clip", "aux_loss_coef"):
            value = getattr(self, key)
            if not _number(value) or value < 0:
                raise ConfigError(f"optim.{key} must be a number >= 0 (0 turns it off), got {value!r}")


@dataclass
class TrainerConfig:
    max_steps: int = 300
    batch_size: int = 32
    val_every: int = 50
    val_batches: int = 4
    ckpt_every: int = 50
    log_every: int = 10
    precision: str = "auto"  # auto: bf16-mixed on GPU, 32-true on CPU
    accelerator: str = "auto"
    devices: int = 1  # processes per node (GPUs, or CPU processes); batch_size is the global batch over all
    strategy: str = "auto"
    num_nodes: int = 1  # machines; torchrun or SLURM starts the processes (Lightning's environments)
    compile: bool = False  # torch.compile the model backbone (not the LightningModule)
    # torch.compile's mode when compile: default, reduce-overhead (CUDA graphs: for launch-bound steps),
    # max-autotune, max-autotune-no-cudagraphs
    compile_mode: str = "default"
    # DDP only: the gradient buckets' size in MiB (None: PyTorch's 25). Under torch.compile each bucket boundary
    # splits the compiled graph (dynamo's DDPOptimizer), so larger buckets mean fewer graphs and fewer all-reduces
    ddp_bucket_mb: int | None = None
    # DDP only: the precision of the gradients' all-reduce; bf16 sends half the bytes (each rank's gradient is
    # rounded to bf16 before the sum, then restored to fp32), fp32 sends them as they are
    ddp_comm: str = "fp32"
    fused_ce: bool | str = "auto"  # fused linear cross-entropy in training steps (no (B, L, V) logits); auto: on CUDA
    data_workers: Any = "auto"  # processes that build training batches ahead of the loop; auto: 2 on CUDA, 0 on CPU
    seed: int = 0
    progress_bar: bool = True  # in a terminal; elsewhere (or false) plain lines every progress_every_s seconds
    progress_every_s: float = 20.0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"trainer.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.accelerator not in ACCELERATORS:
            raise ConfigError(f"trainer.accelerator must be one of {', '.join(ACCELERATORS)}, "
                              f"got {self.accelerator!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"trainer.compile_mode must be one of {', '.join(COMPILE_MODES)}, "
                              f"got {self.compile_mode!r}")
        if self.fused_ce not in (True, False, "auto"):
            raise ConfigError(f"trainer.fused_ce must be auto, true or false, got {self.fused_ce!r}")
        workers = self.data_workers
        if workers != "auto" and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
            raise ConfigError(f"trainer.data_workers must be auto or an integer >= 0, got {self.data_workers!r}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"trainer.strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        bucket = self.ddp_bucket_mb
        if bucket is not None and (isinstance(bucket, bool) or not isinstance(bucket, int) or bucket <= 0):
            raise ConfigError(f"trainer.ddp_bucket_mb must be a positive integer (MiB) or null, got {bucket!r}")
        if self.ddp_comm not in DDP_COMMS:
            raise ConfigError(f"trainer.ddp_comm must be one of {', '.join(DDP_COMMS)}, got {self.ddp_comm!r}")
        if (bucket is not None or self.ddp_comm != "fp32") and (
                self.strategy == "fsdp" or (self.strategy == "auto" and self.devices * self.num_nodes == 1)):
            raise ConfigError("trainer.ddp_bucket_mb and trainer.ddp_comm apply to DDP (trainer.strategy=ddp, or "
                              f"auto over several devices), not to trainer.strategy={self.strategy} on "
                              f"{self.devices * self.num_nodes} device(s)")
        for key in ("max_steps", "batch_size", "val_every", "val_batches", "ckpt_every", "log_every", "devices",
                    "num_nodes"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"trainer.{key} must be positive, got {getattr(self, key)}")
        if self.strategy == "fsdp" and self.max_steps % self.val_every:
            # After fit, Lightning's validate() calls the module without gathering FSDP's root unit (the
            # embedding stays a flat shard): the last validation has to run inside training.
            raise ConfigError(f"trainer.strategy=fsdp needs trainer.val_every ({self.val_every}) to divide "
                              f"trainer.max_steps ({self.max_steps}): the final validation runs inside training")
        if self.batch_size % (self.devices * self.num_nodes):
            raise ConfigError(f"trainer.batch_size = {self.batch_size} (the global batch) must be a multiple of "
                              f"trainer.devices x trainer.num_nodes = {self.devices * self.num_nodes}")


@dataclass
class DataConfig:
    # LM batches carry document ids and every mixer resets at a document boundary; false lets state and
    # attention flow from one packed document into the next (the behaviour before; itself an ablation)
    reset_at_boundaries: bool = True


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = "sqlite:///runs/mlflow.db"
    artifacts: str = "runs/mlartifacts"
    experiment: str = "hybrids-train"
    parent_run_id: str | None = None  # set by sweeps: the trial's run is nested under the study's run
    run_name: str | None = None


@dataclass
class RunConfig:
    dir: str = "runs/train"
    name: str | None = None  # None: derived from the config (model, task, hash), so a rerun resumes
    resume: bool = True


@dataclass
class TrainConfig:
    model: ModelConfig
    task: dict[str, Any] = field(default_factory=lambda: {"name": "mqar"})
    phase2_task: dict[str, Any] | None = None  # two-phase schedule: the phase-2 ("high-quality") data
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if "name" not in self.task:
            raise ConfigError("task needs a name (task=mqar, task=lm, ...)")


def _one_line(err: Exception) -> str:
    """Hydra and OmegaConf put the hint on later lines ("To append ... use +key=..."): keep them."""
    text = " ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())
    return text or type(err).__name__


def compose(overrides: list[str] | None = None, config_name: str = "train") -> TrainConfig:
    """Compose recipes/<config_name>.yaml with Hydra overrides and validate it.

    Args:
        overrides: Hydra override strings, e.g. ["model=mamba-tiny", "trainer.max_steps=100"].
    Returns:
        The typed config.
    Raises:
        ConfigError: with one line naming the bad key or value.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base=None):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []))
    except HydraException as err:
        raise ConfigError(_one_line(err)) from None
    return validate(OmegaConf.to_container(cfg, resolve=True))


def validate(data: dict) -> TrainConfig:
    """A plain dict (e.g. a stored resolved config) -> TrainConfig, with the schema's checks."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), data)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key, msg = getattr(err, "full_key", None), getattr(err, "msg", None)
        raise ConfigError(f"{key}: {msg.strip().splitlines()[0]}" if key and msg else _one_line(err)) from None


def to_dict(config: TrainConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def to_yaml(config: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


DISPLAY_ONLY = ("progress_bar", "progress_every_s")  # trainer keys that change what is printed, not the result
# where a run's processes run, not what they compute (the global batch is fixed): a run resumes on other devices
PLACEMENT = ("devices", "strategy", "num_nodes")
# trainer keys that change how a step is computed (equal within rounding), not what
SPEED_ONLY = ("fused_ce", "data_workers", "compile_mode", "ddp_bucket_mb", "ddp_comm")
UNSCORED = DISPLAY_ONLY + PLACEMENT + SPEED_ONLY  # left out of a run's name and of what a resumed run must match


def scored(data: dict) -> dict:
    """A resolved config without what does not change a run's result (where it logs, how it is named)."""
    data = {k: v for k, v in data.items() if k not in ("tracking", "run")}
    data["trainer"] = {k: v for k, v in data["trainer"].items() if k not in UNSCORED}
    return data


def run_name(config: TrainConfig) -> str:
    """Stable name of a run: a rerun of the same command finds (and resumes) the same directory."""
    if config.run.name:
        return config.run.name
    data = to_dict(config)
    for unscored in UNSCORED:
        data["trainer"].pop(unscored, None)
    data.pop("tracking", None)
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]
    return f"{config.model.name or 'model'}-{config.task['name']}-{digest}"


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}, for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def differences(old: dict[str, Any], new: dict[str, Any], limit: int = 4) -> str:
    """Flat dicts' changed keys: 'optim.lr 0.003 -> 0.001, seeds [0] -> [0, 1]' (at most `limit`, then '+N more')."""
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    parts = [f"{k} {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"+{len(keys) - limit} more")
    return ", ".join(parts) or "unknown (no record of the earlier settings)"
