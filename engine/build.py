"""Assemble a served engine from an EngineConfig: checkpoint → model → pools → engine."""
from __future__ import annotations

import logging

import torch

from hybridserve.engine.async_engine import AsyncEngine
from hybridserve.engine.cache_pools import CachePools, plan_memory
from hybridserve.engine.config import EngineConfig
from hybridserve.engine.llm_engine import LLMEngine
from hybridserve.models.registry import build_model
from hybridserve.weights.loader import load_checkpoint

log = logging.getLogger("hybridserve")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


# generation_config.json fields that become defaults for requests that leave them out (as in vLLM)
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    return DTYPES[name]


def default_budget(device: torch.device) -> int:
    """Bytes for KV pages + state slots when --kv-cache-memory is not given."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.80)
    return 1 << 30


def build_llm_engine(config: EngineConfig) -> tuple[LLMEngine, str]:
    torch.manual_seed(config.seed)  # unseeded requests draw from the global generator
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    ckpt = load_checkpoint(config.model)
    if ckpt.tokenizer is None:
        raise ValueError(f"{ckpt.source}: no tokenizer found next to the checkpoint")
    model = build_model(ckpt, dtype, device)
    max_len = min(config.max_model_len or model.max_model_len, model.max_model_len)
    budget = config.kv_cache_memory or default_budget(device)
    layout = model.cache_layout()
    plan = plan_memory(layout, dtype, budget, config.page_size, config.max_num_seqs, max_len,
                       config.num_kv_pages)
    pools = CachePools(layout, plan, config.page_size, dtype, device)
    name = config.served_model_name or _default_name(config.model, ckpt)
    defaults = {k: ckpt.generation[k] for k in SAMPLING_KEYS if ckpt.generation.get(k) is not None}
    return LLMEngine(model, ckpt.tokenizer, pools, config, max_len, defaults), name


def build_engine(config: EngineConfig, gc_freeze: bool = False) -> AsyncEngine:
    engine, name = build_llm_engine(config)
    return AsyncEngine(engine, name, gc_freeze=gc_freeze)


def _default_name(model: str, ckpt) -> str:
    if model == "embedded":
        from hybridserve.weights.embedded import EMBEDDED_MODEL_NAME
        return EMBEDDED_MODEL_NAME
    from pathlib import Path
    p = Path(model)
    return p.name if p.is_dir() else p.name.split(".")[0]
