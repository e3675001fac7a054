"""Picks a kernel implementation per device: the Triton file on CUDA, the plain reference elsewhere.

Every fast kernel `kernels/<name>_triton.py` exposes the same functions as its reference
`kernels/<name>.py`. HYBRIDSERVE_KERNELS=reference forces the references everywhere (debugging);
HYBRIDSERVE_KERNELS=triton forces the Triton files on every device (on CPU: under TRITON_INTERPRET=1, for tests).
"""
from __future__ import annotations

import importlib
import os
from functools import lru_cache
from types import ModuleType

import torch


@lru_cache(maxsize=None)
def _load(name: str, fast: bool) -> ModuleType:
    if fast:
        try:
            return importlib.import_module(f"hybridserve.kernels.{name}_triton")
        except ImportError:
            pass
    return importlib.import_module(f"hybridserve.kernels.{name}")


def pick(name: str, device: torch.device) -> ModuleType:
    mode = os.environ.get("HYBRIDSERVE_KERNELS", "auto")
    fast = mode == "triton" or (device.type == "cuda" and mode != "reference")
    return _load(name, fast)
