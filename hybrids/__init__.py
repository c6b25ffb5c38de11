"""hybrids: architecture-ablation experiments on hybrid state-space / attention language models.

The public API, imported on first use so that `import hybrids` loads neither torch nor the training,
sweep and tracking stacks (lightning, hydra, optuna, mlflow, transformers):

    model = hybrids.build("zamba-tiny")                    # a HybridLM from a recipe, YAML file or layout
    model.save_pretrained("out/zamba"); hybrids.from_pretrained("out/zamba")   # config.json + model.safetensors
    model = hybrids.from_run("runs/train/<name>")          # a training run's last checkpoint
    hybrids.stats("zamba-7b").table()                      # params, FLOPs, cache bytes (meta device)
    result = hybrids.train(["model=zamba-tiny", "task=mqar", "trainer.max_steps=20"])
    hybrids.run_study(["study=attention-spacing", "n_trials=2"])
    frame = hybrids.study_frame("sqlite:///runs/optuna.db", "attention-spacing")
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "HybridLM": "hybrids.model",
    "build": "hybrids.model",
    "ModelConfig": "hybrids.config",
    "load_config": "hybrids.config",
    "parse_layout": "hybrids.layout",
    "from_hf": "hybrids.hf.interop",
    "to_hf": "hybrids.hf.interop",
    "from_pretrained": "hybrids.save",
    "from_run": "hybrids.save",
    "Stats": "hybrids.accounting",
    "stats": "hybrids.accounting",
    "match_width": "hybrids.accounting",
    "train": "hybrids.training.run",
    "run_study": "search.runner",
    "study_frame": "analysis.frames",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hybrids' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
