"""Architecture name → (model class, checkpoint name map).

A weights module may define `resolve_variant(config, tensors) -> config`: variant switches read from
tensor shapes (gate widths, norm widths, optional sublayers) before the name map is built.
"""
from __future__ import annotations

import importlib

import torch

from hybridserve.weights.checkpoint import Checkpoint

# arch -> (module with the model class, class name, weights module with the rules function, function)
ARCHITECTURES: dict[str, tuple[str, str, str, str]] = {
    "llama": ("hybridserve.models.llama", "LlamaModel", "hybridserve.weights.name_map", "llama_rules"),
    "kotodama": ("hybridserve.models.llama", "LlamaModel", "hybridserve.weights.name_map", "llama_rules"),
    "neollm": ("hybridserve.models.neollm", "NeoLLMModel", "hybridserve.weights.neollm_map", "neollm_rules"),
    "nanohammer": ("hybridserve.models.nanohammer", "NanoHammerModel", "hybridserve.weights.nanohammer_map",
                   "nanohammer_rules"),
    "spartacus": ("hybridserve.models.spartacus", "SpartacusModel", "hybridserve.weights.spartacus_map", "spartacus_rules"),
}


def resolve(arch: str):
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(sorted(ARCHITECTURES))}")
    mod, cls, wmod, rules = ARCHITECTURES[arch]
    model_cls = getattr(importlib.import_module(mod), cls)
    rules_fn = getattr(importlib.import_module(wmod), rules)
    return model_cls, rules_fn


def bind_checkpoint(ckpt: Checkpoint, strict: bool = True):
    """Map checkpoint tensors to the model's canonical names; returns (config, tensors, report)."""
    from hybridserve.weights.name_map import bind

    model_cls, rules_fn = resolve(ckpt.arch)
    variant = getattr(importlib.import_module(ARCHITECTURES[ckpt.arch][2]), "resolve_variant", None)
    hf_config = variant(dict(ckpt.config), ckpt.tensors) if variant else ckpt.config
    config = model_cls.config_class().from_hf(hf_config)
    tensors, report = bind(ckpt.tensors, rules_fn(hf_config), config.num_layers, hf_config, strict=strict)
    return config, tensors, report


def build_model(ckpt: Checkpoint, dtype: torch.dtype, device: torch.device):
    model_cls, _ = resolve(ckpt.arch)
    config, tensors, _ = bind_checkpoint(ckpt, strict=True)
    return model_cls(config, tensors, dtype, device)
