"""Tiny random-weight models of every architecture, built through the real checkpoint name maps."""
from __future__ import annotations

import importlib

import torch

from hybridserve.models.registry import build_model
from hybridserve.weights.checkpoint import Checkpoint
from hybridserve.weights.synth import GENERATORS


def _build(arch: str):
    def build(device, dtype):
        mod, fn = GENERATORS[arch].split(":")
        config, tensors = getattr(importlib.import_module(mod), fn)("tiny", 0)
        ckpt = Checkpoint(arch=arch, config=config, tensors=tensors, source=f"synth:{arch}")
        return build_model(ckpt, dtype, torch.device(device))
    return build


def tiny_models() -> dict:
    return {arch: _build(arch) for arch in GENERATORS}
