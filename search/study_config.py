"""A study: the question, the search space over training-config keys, and how to run it.

Studies live in recipes/study/<name>.yaml; `hybrids sweep study=<name> key=value ...` overrides their
fields, and `train.<hydra override>` entries add to the training overrides of every trial.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from blocks import ConfigError
from hybrids.config import read_yaml
from search.protocol import LR, NOT_ARM, WD, Match, check_grid, parse_match

STUDIES = Path(__file__).resolve().parents[1] / "recipes" / "study"
KINDS = ("spacing", "ablation", "schedule", "generic")
SAMPLERS = ("grid", "tpe", "random")
NAMED = ("variant", "arm")  # space keys whose choices name override lists under `variants`
DEFAULT_STORAGE = "sqlite:///runs/optuna.db"  # one worker; several share a journal file or an RDB


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
    # "variant" and "arm" choices -> override lists: variants are task settings (arms are compared within each),
    # arms are named configurations that no single key expresses (e.g. a layout together with block options)
    variants: dict[str, list[str]] = field(default_factory=dict)
    # {"by": "params" | "flops" | "state", "reference": [overrides], "multiple_of": 8}; None or "none": not matched
    match: dict[str, Any] | None = None
    lr_grid: list[float] | None = None  # every arm trains at each learning rate; the report keeps its best
    wd_grid: list[float] | None = None  # and at each weight decay (optional)
    x: str | None = None  # x axis of the main figure (a trial attr such as n_attention)
    storage: str | None = None  # None: sqlite:///runs/optuna.db (1 worker) or a journal file (several)
    workers: int = 1
    devices: list[int] | None = None  # GPU indices: worker i trains on devices[i % len(devices)]; None: as torch picks
    heartbeat_interval: float = 5.0
    grace_period: float = 30.0
    max_retry: int = 2
    stop_after: float | None = None  # seconds: start no trial expected to end later (search.deadline); None: no limit
    runs_dir: str = "runs/sweeps"
    tracking_uri: str = "sqlite:///runs/mlflow.db"
    artifacts: str = "runs/mlartifacts"
    # `hybrids eval` options run on each trial's finished run (e.g. [tasks=probes, max_len=256]); its metrics
    # ("probe/<probe>/<len>/accuracy", "lm_eval/<task>/<metric>") join the trial's, so `metric` may name one
    eval: list[str] | None = None

    def __post_init__(self) -> None:
        self._check_types()
        self.space = {k: v if isinstance(v, Param) else _param(k, v) for k, v in self.space.items()}
        if self.kind not in KINDS:
            raise ConfigError(f"study kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.direction not in ("maximize", "minimize"):
            raise ConfigError(f"direction must be maximize or minimize, got {self.direction!r}")
        if self.pruner not in ("median", "none"):
            raise ConfigError(f"pruner must be median or none, got {self.pruner!r}")
        if self.workers < 1:
            raise ConfigError(f"workers must be an integer >= 1, got {self.workers}")
        if self.n_trials is not None and self.n_trials < 1:
            raise ConfigError(f"n_trials must be an integer >= 1 (or left out: the grid's size), got {self.n_trials}")
        if self.stop_after is not None and self.stop_after <= 0:
            raise ConfigError(f"stop_after must be a number of seconds > 0, got {self.stop_after}")
        if self.max_retry < 0:
            raise ConfigError(f"max_retry must be an integer >= 0, got {self.max_retry}")
        if self.heartbeat_interval <= 0:
            raise ConfigError(f"heartbeat_interval must be a number of seconds > 0, got {self.heartbeat_interval}")
        if self.grace_period <= self.heartbeat_interval:
            raise ConfigError(f"grace_period must be a number of seconds > heartbeat_interval = "
                              f"{self.heartbeat_interval} (else a live trial looks stale), got {self.grace_period}")
        if not self.seeds:
            raise ConfigError("seeds must list at least one seed, e.g. seeds=[0]")
        for key in NAMED:
            missing = set(self.space[key].choices) - set(self.variants) if key in self.space else set()
            if missing:
                raise ConfigError(f"{key} choice(s) {', '.join(sorted(missing))} have no entry under 'variants'")
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
        if not self.space:
            raise ConfigError(f"study {self.name!r} has an empty search space: give 'space' at least one key, "
                              "e.g. space: {model.layout: {choices: [M, '2M:A*']}}")
        if self.sampler == "grid":
            ranged = [k for k, p in self.space.items() if p.type != "categorical"]
            if ranged:
                raise ConfigError(f"the grid sampler needs categorical dimensions; {', '.join(ranged)} are ranges")
            self.n_trials = min(self.n_trials or len(self.grid()), len(self.grid()))
        self.n_trials = self.n_trials or 8

    def _check_types(self) -> None:
        """One line naming the key for a value of the wrong type (a YAML file or key=value gives any type)."""
        expect = {"name": str, "question": str, "kind": str, "metric": str, "direction": str, "sampler": str,
                  "pruner": str, "workers": int, "max_retry": int, "heartbeat_interval": float,
                  "grace_period": float, "runs_dir": str, "tracking_uri": str, "artifacts": str}
        optional = {"n_trials": int, "storage": str, "x": str, "match": dict, "stop_after": float}
        containers = {"seeds": list, "train": list, "space": dict, "variants": dict}
        for key, kind in [*expect.items(), *optional.items(), *containers.items()]:
            value = getattr(self, key)
            if key in optional and (value is None or (key == "match" and value == "none")):
                continue  # match: none opts out of budget matching (search.protocol.parse_match)
            if not _is_a(value, kind):
                name = {int: "an integer", float: "a number", str: "a string", list: "a list",
                        dict: "a mapping"}[kind]
                raise ConfigError(f"{key} must be {name}, got {value!r}")
        if self.devices is not None and (not isinstance(self.devices, list) or not self.devices
                                         or not all(_is_a(d, int) and d >= 0 for d in self.devices)):
            raise ConfigError(f"devices must be a non-empty list of GPU indices, e.g. [0, 1], got {self.devices!r}")
        if not all(_is_a(s, int) for s in self.seeds):
            raise ConfigError(f"seeds must be a list of integers, got {self.seeds!r}")
        if self.eval is not None:
            if not isinstance(self.eval, list) or not all(isinstance(o, str) for o in self.eval):
                raise ConfigError(f"eval must be a list of hybrids eval options (key=value), e.g. [tasks=probes, "
                                  f"max_len=256], got {self.eval!r}")
            if any(o.startswith(("run=", "model=", "out=")) for o in self.eval):
                raise ConfigError("eval runs on each trial's own run, into its own folder: leave out run=, model= "
                                  "and out=")
            from hybrids.evaluation.runner import parse_options

            parse_options(["run=.", *self.eval])
        if not all(isinstance(o, str) for o in self.train):
            raise ConfigError(f"train must be a list of override strings (key=value), got {self.train!r}")

    def grid(self) -> list[dict[str, Any]]:
        """Every combination of the categorical dimensions, in a fixed order."""
        keys = list(self.space)
        choices = [self.space[k].choices for k in keys]
        return [dict(zip(keys, values, strict=True)) for values in itertools.product(*choices)]

    def group_by(self) -> list[str]:
        return [k for k in self.space if k != "trainer.seed"]

    @property
    def tracked(self) -> bool:
        """False with tracking_uri=none: no MLflow runs (a GPU box with only torch and optuna can sweep)."""
        return self.tracking_uri.lower() != "none"

    def arm_by(self) -> list[str]:
        """The dimensions that define an arm: the space without seed, learning rate and weight decay."""
        return [k for k in self.space if k not in NOT_ARM]

    @property
    def matching(self) -> Match | None:
        """The study's width matching, parsed; None when its arms are not budget-matched."""
        return parse_match(self.match)

    def device(self, worker: int) -> int | None:
        """The GPU that worker number `worker` trains on (None: the study names no devices)."""
        return None if self.devices is None else self.devices[worker % len(self.devices)]

    def resolved_storage(self) -> str:
        if self.storage:
            return self.storage
        return "journal:runs/optuna.journal" if self.workers > 1 else DEFAULT_STORAGE


def _is_a(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, int | float) and math.isfinite(value)
    return isinstance(value, kind)


def _param(name: str, data: Any) -> Param:
    if not isinstance(data, dict):
        raise ConfigError(f"space.{name} must be a mapping such as {{choices: [...]}}, got {data!r}")
    valid = {f.name for f in dataclasses.fields(Param)}
    unknown = set(data) - valid
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(sorted(unknown))} in space.{name}; "
                          f"valid: {', '.join(sorted(valid))}")
    try:
        return Param(**data)
    except ConfigError as err:
        raise ConfigError(f"space.{name}: {err}") from None


def _coerce(key: str, value: str) -> Any:
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        raise ConfigError(f"value of {key!r} is not valid YAML: {value!r}") from None


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
    if not path.exists():
        raise ConfigError(f"unknown study {name!r}; built-in studies: {', '.join(names)} (or a path to a YAML file)")
    data = {"name": path.stem, **read_yaml(path, "study")}
    valid = {f.name for f in dataclasses.fields(StudyConfig)}
    for key, value in args.items():
        if key not in valid:
            raise ConfigError(f"unknown study key {key!r}; valid: {', '.join(sorted(valid))}")
        data[key] = _coerce(key, value)
    unknown = set(data) - valid
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(sorted(unknown))} in {path}; valid: {', '.join(sorted(valid))}")
    config = StudyConfig(**data)
    return config, extra_train
