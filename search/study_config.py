"""A study: the question, the search space over training-config keys, and how to run it.

Studies live in recipes/study/<name>.yaml; `hybrids sweep study=<name> key=value ...` overrides their
fields, and `train.<hydra override>` entries add to the training overrides of every trial.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from blocks import ConfigError
from search.protocol import LR, NOT_ARM, WD, Match, check_grid, parse_match

STUDIES = Path(__file__).resolve().parents[1] / "recipes" / "study"
KINDS = ("spacing", "ablation", "schedule", "generic")
SAMPLERS = ("grid", "tpe", "random")


@dataclass
class Param:
    """One search dimension: categorical choices, or an int / float range."""

    type: str = "categorical"
    choices: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False

    def __post_init__(self) -> None:
        if self.type not in ("categorical", "int", "float"):
            raise ConfigError(f"search space type must be categorical, int or float, got {self.type!r}")
        if self.type == "categorical" and not self.choices:
            raise ConfigError("a categorical search dimension needs a non-empty 'choices' list")
        if self.type != "categorical" and (self.low is None or self.high is None or self.low > self.high):
            raise ConfigError(f"a {self.type} search dimension needs low <= high")


@dataclass
class StudyConfig:
    name: str
    question: str = ""
    kind: str = "generic"
    metric: str = "val/accuracy"
    direction: str = "maximize"
    n_trials: int | None = None  # None: the grid's size (grid sampler) or 8
    sampler: str = "grid"
    pruner: str = "median"  # median | none: prune on the validation metric
    seeds: list[int] = field(default_factory=lambda: [0])
    train: list[str] = field(default_factory=list)  # Hydra overrides of recipes/train.yaml for every trial
    space: dict[str, Param] = field(default_factory=dict)
    variants: dict[str, list[str]] = field(default_factory=dict)  # "variant" choices -> override lists
    # {"by": "params" | "flops" | "state", "reference": [overrides], "multiple_of": 8}; None or "none": not matched
    match: dict[str, Any] | None = None
    lr_grid: list[float] | None = None  # every arm trains at each learning rate; the report keeps its best
    wd_grid: list[float] | None = None  # and at each weight decay (optional)
    x: str | None = None  # x axis of the main figure (a trial attr such as n_attention)
    storage: str | None = None  # None: sqlite:///runs/optuna.db (1 worker) or a journal file (several)
    workers: int = 1
    heartbeat_interval: float = 5.0
    grace_period: float = 30.0
    max_retry: int = 2
    runs_dir: str = "runs/sweeps"
    tracking_uri: str = "sqlite:///runs/mlflow.db"
    artifacts: str = "runs/mlartifacts"

    def __post_init__(self) -> None:
        self.space = {k: v if isinstance(v, Param) else Param(**v) for k, v in self.space.items()}
        if self.kind not in KINDS:
            raise ConfigError(f"study kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.direction not in ("maximize", "minimize"):
            raise ConfigError(f"direction must be maximize or minimize, got {self.direction!r}")
        if self.pruner not in ("median", "none"):
            raise ConfigError(f"pruner must be median or none, got {self.pruner!r}")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if "variant" in self.space:
            missing = set(self.space["variant"].choices) - set(self.variants)
            if missing:
                raise ConfigError(f"variant choice(s) {', '.join(sorted(missing))} have no entry under 'variants'")
        self.match = self.match if parse_match(self.match) is not None else None
        self.lr_grid = check_grid("lr_grid", self.lr_grid, positive=True)
        self.wd_grid = check_grid("wd_grid", self.wd_grid, positive=False)
        for key, grid in ((LR, self.lr_grid), (WD, self.wd_grid)):
            if grid is None:
                continue
            if key in self.space and self.space[key].choices != grid:
                raise ConfigError(f"{key} is both a search dimension and set by {'lr_grid' if key == LR else 'wd_grid'}"
                                  "; keep one of them")
            self.space[key] = Param(choices=list(grid))
        if len(self.seeds) > 1:
            self.space.setdefault("trainer.seed", Param(choices=list(self.seeds)))
        if self.sampler == "grid":
            ranged = [k for k, p in self.space.items() if p.type != "categorical"]
            if ranged:
                raise ConfigError(f"the grid sampler needs categorical dimensions; {', '.join(ranged)} are ranges")
            self.n_trials = min(self.n_trials or len(self.grid()), len(self.grid()))
        self.n_trials = self.n_trials or 8

    def grid(self) -> list[dict[str, Any]]:
        """Every combination of the categorical dimensions, in a fixed order."""
        keys = list(self.space)
        choices = [self.space[k].choices for k in keys]
        return [dict(zip(keys, values, strict=True)) for values in itertools.product(*choices)]

    def group_by(self) -> list[str]:
        return [k for k in self.space if k != "trainer.seed"]

    def arm_by(self) -> list[str]:
        """The dimensions that define an arm: the space without seed, learning rate and weight decay."""
        return [k for k in self.space if k not in NOT_ARM]

    @property
    def matching(self) -> Match | None:
        """The study's width matching, parsed; None when its arms are not budget-matched."""
        return parse_match(self.match)

    def resolved_storage(self) -> str:
        if self.storage:
            return self.storage
        return "journal:runs/optuna.journal" if self.workers > 1 else "sqlite:///runs/optuna.db"


def _coerce(value: str) -> Any:
    return yaml.safe_load(value)


def load_study(overrides: list[str]) -> tuple[StudyConfig, list[str]]:
    """StudyConfig from `study=<name>` plus `key=value` overrides; also returns extra train overrides.

    Raises:
        ConfigError: unknown study or key.
    """
    args = dict(o.split("=", 1) for o in overrides if "=" in o and not o.startswith("train."))
    extra_train = [o.removeprefix("train.") for o in overrides if o.startswith("train.")]
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"expected key=value, got {bad[0]!r}")
    name = args.pop("study", None)
    names = sorted(p.stem for p in STUDIES.glob("*.yaml"))
    if name is None:
        raise ConfigError(f"name a study: study=<name>; built-in studies: {', '.join(names)}")
    path = STUDIES / f"{name}.yaml" if (STUDIES / f"{name}.yaml").is_file() else Path(name)
    if not path.is_file():
        raise ConfigError(f"unknown study {name!r}; built-in studies: {', '.join(names)} (or a path to a YAML file)")
    data = {"name": path.stem, **yaml.safe_load(path.read_text())}
    valid = {f.name for f in dataclasses.fields(StudyConfig)}
    for key, value in args.items():
        if key not in valid:
            raise ConfigError(f"unknown study key {key!r}; valid: {', '.join(sorted(valid))}")
        data[key] = _coerce(value)
    unknown = set(data) - valid
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(sorted(unknown))} in {path}; valid: {', '.join(sorted(valid))}")
    config = StudyConfig(**data)
    return config, extra_train
