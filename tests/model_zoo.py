"""Tiny random-weight models of every architecture, built through the real checkpoint name maps."""
from __future__ import annotations

import torch

from hybridserve.models.llama import LlamaModel


def _llama(kotodama: bool):
    def build(device, dtype):
        from test_llama_engine import tiny_config, tiny_weights
        c = tiny_config(kotodama)
        return LlamaModel(c, tiny_weights(c), dtype, device)
    return build


def tiny_models() -> dict:
    return {"llama": _llama(False), "kotodama": _llama(True)}
