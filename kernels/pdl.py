"""Programmatic dependent launch (Hopper and newer): a kernel launched with it may start while the kernel
before it in the stream is still running, and waits (`gdc_wait`) only where it first reads that kernel's
output. A decode step at batch 1 is a chain of ~100 short matmuls; with this each one's weight stream
starts during its predecessor's tail instead of after a full drain and launch gap.

Contract for a kernel launched with `launch_pdl`: it must call `gdc_wait` before any load of data an
earlier kernel wrote (activations, caches, states touched this step) and before any store. Only reads of
data constant during the step (weights, and the step's metadata that the host copied in before it, such as
the sequence lengths) and of its own slot state before anything else touches it may come first. Kernels that
do not opt in behave as usual.

HYBRIDSERVE_PDL=0 turns it off (debugging, or to measure its effect).
"""
from __future__ import annotations

import os
from functools import lru_cache

import torch


@lru_cache(maxsize=None)
def _supported(device_index: int) -> bool:
    if os.environ.get("HYBRIDSERVE_PDL", "1") == "0" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if torch.cuda.get_device_capability(device_index)[0] < 9:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with programmatic dependent launch."""
    return device.type == "cuda" and _supported(device.index if device.index is not None else
                                                torch.cuda.current_device())


def launch_kwargs(device: torch.device) -> dict:
    """Extra keyword arguments for a Triton launch (PDL constexpr + the launch attribute)."""
    on = enabled(device)
    return {"PDL": on, "launch_pdl": True} if on else {"PDL": False}
