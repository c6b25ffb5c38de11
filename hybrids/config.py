"""The model config: a layout plus widths and per-block options, validated, with recipes in YAML.

Precedence: ModelConfig defaults < recipe file < overrides (keyword arguments or dotted keys such
as "blocks.mamba.d_state=32"). Unknown keys are errors naming the valid ones.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from blocks import ConfigError, registry

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "model"
INJECT = ("next", "residual")


@dataclass
class ModelConfig:
    """A hybrid model.

    layout: layout string ("6M:A*"), see hybrids.layout. depth: tile the layout to this many backbone
    layers. blocks: per block name, overrides of that block's config (e.g. {"mamba": {"d_state": 16},
    "shared_attention": {"concat_embeddings": False, "lora_rank": 8, "rope": True}}). inject: where a
    shared block's output goes: "next" = added to the input of the next layer before its pre-norm (Zamba),
    "residual" = added to the residual stream. init_std: the standard deviation of the embedding and of
    every Linear weight at initialisation (HF's initializer_range); Mamba (v1) mixers keep mamba-ssm's own
    initialisation (see `blocks.mamba.Mamba.init_weights`) and SSM parameters theirs.
    """

    layout: str
    depth: int | None = None
    d_model: int = 128
    vocab_size: int = 256
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02
    inject: str = "next"
    backend: str = "auto"
    blocks: dict[str, dict[str, Any]] = field(default_factory=dict)
    name: str | None = None

    def __post_init__(self) -> None:
        if self.inject not in INJECT:
            raise ConfigError(f"inject must be one of {', '.join(INJECT)}, got {self.inject!r}")
        if self.d_model <= 0 or self.vocab_size <= 0:
            raise ConfigError("d_model and vocab_size must be positive")
        if not self.init_std > 0:
            raise ConfigError(f"init_std must be positive, got {self.init_std}")
        for name, overrides in self.blocks.items():
            entry = registry.get(name)
            valid = {f.name for f in dataclasses.fields(entry.config_cls)} - {"d_model"}
            unknown = set(overrides) - valid
            if unknown:
                raise ConfigError(f"unknown key(s) {', '.join(sorted(unknown))} for block {name!r}; "
                                  f"valid: {', '.join(sorted(valid))}")
            if entry.kind == "mixer" and "out_proj" in overrides:
                raise ConfigError(f"blocks.{name}.out_proj is not a model option: a layer needs its mixer's output "
                                  "projection, and a parallel layer drops its branches' projections itself")

    def block_options(self, name: str) -> dict[str, Any]:
        return dict(self.blocks.get(name, {}))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def _set_dotted(target: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        target = target.setdefault(part, {})
    target[parts[-1]] = value


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping in a YAML file, or one line saying why it can't be read.

    Args:
        path: the file.
        what: what the file should hold ("model config", "study"), for the message.
    Returns:
        The parsed mapping (an empty file gives {}).
    Raises:
        ConfigError: a missing file, a directory, an unreadable or malformed file, or YAML that is not a mapping.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; expected a {what} YAML file")
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no such {what} file: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read {what} file {path}: {getattr(err, 'strerror', None) or err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"{what} file {path} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} file {path} must hold a mapping of keys, got a {type(data).__name__}")
    return data


def load_config(source: str | ModelConfig, **overrides: Any) -> ModelConfig:
    """A ModelConfig from a recipe name, a YAML path, a layout string or a config, plus overrides.

    Args:
        source: "zamba-7b" (a file in recipes/model), "path/to/model.yaml", or a layout ("6M:A*").
        overrides: ModelConfig fields, or dotted keys ("blocks.mamba.d_state"), applied last.
    Returns:
        The validated config.
    Raises:
        ConfigError: unknown keys or bad values, with the valid choices.
    """
    if isinstance(source, ModelConfig):
        data = source.to_dict()
    elif (RECIPES / f"{source}.yaml").is_file():
        data = read_yaml(RECIPES / f"{source}.yaml", "model config")
    elif source.endswith((".yaml", ".yml")) or Path(source).is_dir():
        data = read_yaml(source, "model config")
    else:
        data = {"layout": source}
    nested: dict = {}
    for key, value in overrides.items():
        _set_dotted(nested, key, value)
    data = _merge(data, nested)
    valid = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(data) - valid
    if unknown:
        raise ConfigError(f"unknown model config key(s) {', '.join(sorted(unknown))}; "
                          f"valid: {', '.join(sorted(valid))}")
    if "layout" not in data:
        raise ConfigError("the model config needs a layout")
    return ModelConfig(**data)
