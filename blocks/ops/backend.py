"""Backend choice for the numeric ops: auto | torch | mamba_ssm.

`mamba_ssm` is imported lazily, only for CUDA tensors: on CPU (or without its compiled extension)
importing it fails, and the package must import everywhere.
"""

from __future__ import annotations

import functools
import importlib
import logging

import torch

from blocks.base import ConfigError

BACKENDS = ("auto", "torch", "mamba_ssm")
log = logging.getLogger("hybrids")


@functools.cache
def importable(module: str) -> bool:
    """Whether `module` imports (mamba_ssm fails without its compiled CUDA extension)."""
    try:
        importlib.import_module(module)
    except Exception:  # ImportError, OSError from a missing .so, RuntimeError from CUDA init
        return False
    return True


def kernels_available() -> bool:
    return torch.cuda.is_available() and importable("mamba_ssm")


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


@functools.cache
def _announce(requested: str, chosen: str, device_type: str) -> None:
    log.info("ops backend: %s (requested %s, device %s)", chosen, requested, device_type)


def resolve(name: str, device: torch.device) -> str:
    """The backend that runs for tensors on `device`: "torch" or "mamba_ssm".

    Raises:
        ConfigError: for an unknown name, or "mamba_ssm" asked for where it cannot run.
    """
    check_backend(name)
    on_cuda = device.type == "cuda"
    if name == "mamba_ssm" and not on_cuda:
        raise ConfigError(f"backend 'mamba_ssm' needs CUDA tensors, got device {device}")
    if name == "mamba_ssm" and not importable("mamba_ssm"):
        raise ConfigError("backend 'mamba_ssm' asked for but mamba_ssm does not import (pip install .[cuda])")
    chosen = "mamba_ssm" if name == "mamba_ssm" or (name == "auto" and on_cuda and importable("mamba_ssm")) \
        else "torch"
    _announce(name, chosen, device.type)
    return chosen
