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
def import_error(module: str) -> str | None:
    """Why `module` does not import ("ImportError: libcudart.so.13: ..."), or None when it does."""
    try:
        importlib.import_module(module)
    except Exception as err:  # ImportError, OSError from a missing .so, RuntimeError from CUDA init
        return f"{type(err).__name__}: {err}"
    return None


@torch.compiler.assume_constant_result
def importable(module: str) -> bool:
    """Whether `module` imports (mamba_ssm fails without its compiled CUDA extension)."""
    return import_error(module) is None


def kernels_available() -> bool:
    return torch.cuda.is_available() and importable("mamba_ssm")


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


@functools.cache
def _announce(requested: str, chosen: str, device_type: str) -> None:
    log.info("ops backend: %s (requested %s, device %s)", chosen, requested, device_type)


@functools.cache
def _warn_no_kernels(error: str) -> None:
    # once per process: a GPU run on the PyTorch ops is many times slower, which an info line would hide
    log.warning("backend auto on CUDA: mamba_ssm does not import (%s); using the PyTorch ops, which are much "
                "slower (install the kernels with pip install .[cuda], or set backend=torch to silence this)", error)


@functools.cache
def warn_no_boundaries(kernel: str) -> None:
    """Once per process and kernel: a batch with document ids runs that op on the PyTorch path."""
    log.warning("%s cannot reset its state at document boundaries; batches with document ids run it on the "
                "PyTorch path, which is much slower (data.reset_at_boundaries=false keeps the kernel and lets "
                "state flow across documents)", kernel)


@torch.compiler.assume_constant_result  # torch.compile calls it while tracing: no graph break per op
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
        raise ConfigError(f"backend 'mamba_ssm' asked for but mamba_ssm does not import "
                          f"({import_error('mamba_ssm')}); pip install .[cuda]")
    chosen = "torch"
    if name == "mamba_ssm":
        chosen = "mamba_ssm"
    elif name == "auto" and on_cuda:  # mamba_ssm is imported for CUDA tensors only: elsewhere its import can only fail
        error = import_error("mamba_ssm")
        if error is None:
            chosen = "mamba_ssm"
        else:
            _warn_no_kernels(error)
    _announce(name, chosen, device.type)
    return chosen
