"""The native save format, and a training run's checkpoint reopened as a model.

A saved model is a folder:
- config.json: {"format": "hybrids", "format_version": 1, "hybrids_version", "model": the ModelConfig as a
  mapping, "dtype": the weights' dtype ("float32"), "tokenizer": "byte" | "tokenizer.json" (a copy in the
  folder) | null}.
- model.safetensors: the state dict with every tensor stored once. A tensor held under several names (the LM
  head tied to the embedding) is stored under one of them and re-tied by building the model from its config;
  a shared block is one module of the model, so its weights have one name to begin with.

A training run (runs/train/<name>/) holds config.yaml (the resolved TrainConfig) and Lightning checkpoints
(checkpoints/last.ckpt, best.ckpt, step*.ckpt) whose state dict holds the model's weights under "model.".
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml

from blocks import ConfigError
from hybrids.config import ModelConfig
from hybrids.model import HybridLM

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"


def save_pretrained(model: HybridLM, directory: str | Path, tokenizer: str | Path | None = None) -> Path:
    """Write `model` to `directory` (created if needed) as config.json + model.safetensors.

    Args:
        model: the model; its weights are saved in their dtype, from whatever device they are on.
        directory: the folder to write.
        tokenizer: "byte", the path of an HF tokenizer.json (copied into the folder), or None.
    Returns:
        The folder.
    """
    from safetensors.torch import save_model

    import hybrids

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    saved_tokenizer = None
    if tokenizer == "byte":
        saved_tokenizer = "byte"
    elif tokenizer is not None:
        source = Path(tokenizer)
        if not source.is_file():
            raise ConfigError(f"no such tokenizer file: {source}")
        if source.resolve() != (directory / TOKENIZER_FILE).resolve():
            shutil.copyfile(source, directory / TOKENIZER_FILE)
        saved_tokenizer = TOKENIZER_FILE
    config = {"format": "hybrids", "format_version": FORMAT_VERSION, "hybrids_version": hybrids.__version__,
              "model": model.config.to_dict(), "dtype": str(model.embed.weight.dtype).removeprefix("torch."),
              "tokenizer": saved_tokenizer}
    save_model(model, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    return directory


def read_saved_config(directory: str | Path) -> dict:
    """The config.json of a saved model.

    Raises:
        ConfigError: no such folder, no config.json in it, or a file that is not a hybrids config.
    """
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise ConfigError(f"no such model folder: {directory}")
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{directory} holds no {CONFIG_FILE}: not a saved model (save one with "
                          "model.save_pretrained(dir))") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from None
    if not isinstance(config, dict) or config.get("format") != "hybrids" or "model" not in config:
        raise ConfigError(f"{path} is not a hybrids model config (no \"format\": \"hybrids\" and \"model\")")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ConfigError(f"{path} has format_version {config['format_version']}; this hybrids reads up to "
                          f"{FORMAT_VERSION}: upgrade hybrids")
    return config


def saved_tokenizer(directory: str | Path) -> str | None:
    """The tokenizer a saved model names: "byte", the path of its tokenizer.json, or None."""
    name = read_saved_config(directory).get("tokenizer")
    return str(Path(directory) / name) if name not in (None, "byte") else name


def from_pretrained(directory: str | Path, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> HybridLM:
    """The model saved in `directory` by `save_pretrained`, in eval mode.

    Args:
        directory: the folder.
        device: where to put the weights (default: the caller's default device).
        dtype: cast the weights to this dtype (default: the saved dtype).
    Raises:
        ConfigError: a folder that is no saved model, or weights that do not fit the config.
    """
    from safetensors.torch import load_model

    config = read_saved_config(directory)
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise ConfigError(f"{directory} holds no {WEIGHTS_FILE}")
    with torch.device(device or "cpu"):
        model = HybridLM(ModelConfig(**config["model"]))
    model.to(getattr(torch, config.get("dtype", "float32")))
    try:
        load_model(model, str(weights), strict=True, device=str(model.embed.weight.device))
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[0]
        raise ConfigError(f"the weights in {weights} do not fit its config: {reason}") from None
    return model.to(dtype=dtype).eval() if dtype is not None else model.eval()


def run_config(run_dir: str | Path) -> dict:
    """The resolved training config (config.yaml) of a run folder, as a mapping.

    Raises:
        ConfigError: no such folder, or no config.yaml in it.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"no such run folder: {run_dir}")
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} holds no config.yaml: not a training run folder (runs/train/<name>)")
    return yaml.safe_load(path.read_text())


def run_tokenizer(run_dir: str | Path) -> str | None:
    """The tokenizer a run's text trained with ("byte" or a tokenizer.json path); None for a synthetic task."""
    task = run_config(run_dir).get("task", {})
    return task.get("tokenizer", "byte") if task.get("name") == "lm" else None


def from_run(run_dir: str | Path, checkpoint: str = "last", device: str | torch.device | None = None) -> HybridLM:
    """A training run's checkpoint as a model, in eval mode (`hybrids.from_run`).

    Args:
        run_dir: the run folder (runs/train/<name>).
        checkpoint: "last", "best", a file name in its checkpoints/ folder, or the path of a .ckpt file.
        device: where to put the weights (default: CPU).
    Raises:
        ConfigError: a folder that is no run, or a checkpoint that is missing (listing those present).
    """
    run_dir = Path(run_dir)
    model_config = ModelConfig(**run_config(run_dir)["model"])
    folder = run_dir / "checkpoints"
    path = Path(checkpoint)
    if not path.is_file():
        path = folder / (checkpoint if checkpoint.endswith(".ckpt") else f"{checkpoint}.ckpt")
    if not path.is_file():
        present = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
        raise ConfigError(f"no checkpoint {checkpoint!r} in {folder}; present: {', '.join(present) or 'none'}")
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    with torch.device(device or "cpu"):
        model = HybridLM(model_config)
    model.load_state_dict(weights, strict=True)
    return model.eval()
