"""flash-linear-attention's gated delta rule kernel as an optional fast path, imported on first use.

`fla` is imported for CUDA tensors only. Its gated chunk kernels give wrong gradients on Hopper (sm_90)
with Triton before 3.7.1, and its newer releases refuse to run there; both cases, and an `fla` that does
not import, fall back to the PyTorch path with one warning per process.
"""

from __future__ import annotations

import functools
import logging
import re

import torch

from blocks.base import ConfigError
from blocks.ops.backend import import_error

BACKENDS = ("auto", "torch", "fla")
HOPPER_MIN_TRITON = (3, 7, 1)
log = logging.getLogger("hybrids")


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ConfigError(f"gated_deltanet: backend must be one of {', '.join(BACKENDS)}, got {name!r} "
                          "(set blocks.gated_deltanet.backend)")
    return name


def version_tuple(version: str) -> tuple[int, ...]:
    """(3, 6, 0) from "3.6.0", "3.6.0+git1a2b" or "3.7.1rc1"; only the leading numbers count."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def refusal(error: str | None, capability: tuple[int, int], triton_version: str | None) -> str | None:
    """Why the fla kernel cannot serve on this device, or None when it can.

    Args:
        error: why `fla` does not import, or None.
        capability: the CUDA device's compute capability, (9, 0) for Hopper.
        triton_version: the installed Triton's version string.
    """
    if error is not None:
        return f"flash-linear-attention does not import ({error})"
    if capability[0] == 9 and version_tuple(triton_version or "0") < HOPPER_MIN_TRITON:
        return (f"flash-linear-attention's gated kernels give wrong results on Hopper with Triton {triton_version} "
                f"(needs >= {'.'.join(map(str, HOPPER_MIN_TRITON))})")
    return None


@functools.cache
def _device_refusal(device_index: int) -> str | None:
    error = import_error("fla.ops.gated_delta_rule")
    triton_version = None
    if error is None:
        import triton

        triton_version = triton.__version__
    return refusal(error, torch.cuda.get_device_capability(device_index), triton_version)


@functools.cache
def warn_fallback(reason: str) -> None:
    # once per process: a GPU run on the PyTorch ops is many times slower, which an info line would hide
    log.warning("gated_deltanet backend auto on CUDA: %s; using the PyTorch chunked form, which is much slower "
                "(pip install flash-linear-attention with a Triton that suits the GPU, or set backend=torch to "
                "silence this)", reason)


@torch.compiler.assume_constant_result  # torch.compile calls it while tracing: no graph break
def resolve(name: str, device: torch.device) -> str:
    """The backend that runs for tensors on `device`: "torch" or "fla".

    Raises:
        ConfigError: an unknown name, or "fla" asked for where it cannot run.
    """
    check_backend(name)
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return "torch"
    if device.type != "cuda":
        raise ConfigError(f"gated_deltanet: backend 'fla' needs CUDA tensors, got device {device}")
    reason = _device_refusal(device.index if device.index is not None else torch.cuda.current_device())
    if reason is None:
        return "fla"
    if name == "fla":
        raise ConfigError(f"gated_deltanet: backend 'fla' asked for but {reason}")
    warn_fallback(reason)
    return "torch"


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, return_final_state=False):
    """fla's chunked kernel on our shapes (those of `blocks.ops.delta_rule.delta_rule_chunked`)."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as kernel

    o, final = kernel(q.contiguous(), k.contiguous(), v.contiguous(), g.float().contiguous(),
                      beta.to(v.dtype).contiguous(), scale=scale, initial_state=initial_state,
                      output_final_state=return_final_state)
    return (o, final) if return_final_state else o
