"""Tiny random-weight models of every architecture, built through the real checkpoint name maps."""
from __future__ import annotations

import importlib

import torch

from hybridserve.models.registry import build_model
from hybridserve.weights.checkpoint import Checkpoint
from hybridserve.weights.synth import GENERATORS


def tiny_model(arch: str, device, dtype, vocab: int | None = None):
    """The tiny model of `arch`; `vocab`: its embedding and head cut to that many rows."""
    mod, fn = GENERATORS[arch].split(":")
    config, tensors = getattr(importlib.import_module(mod), fn)("tiny", 0)
    if vocab is not None:
        full = config["vocab_size"]
        tensors = {k: (t[:vocab] if t.shape and t.shape[0] == full else t) for k, t in tensors.items()}
        config = dict(config, vocab_size=vocab)
    ckpt = Checkpoint(arch=arch, config=config, tensors=tensors, source=f"synth:{arch}")
    return build_model(ckpt, dtype, torch.device(device))


def _build(arch: str):
    return lambda device, dtype: tiny_model(arch, device, dtype)


def tiny_models() -> dict:
    return {arch: _build(arch) for arch in GENERATORS}
