"""Picks a kernel implementation per device: the Triton file on CUDA, the plain reference elsewhere.

Every fast kernel `kernels/<name>_triton.py` exposes the same functions as its reference
`kernels/<name>.py`. HYBRIDSERVE_KERNELS=reference forces the references everywhere (debugging).
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
    fast = device.type == "cuda" and os.environ.get("HYBRIDSERVE_KERNELS", "auto") != "reference"
    return _load(name, fast)
