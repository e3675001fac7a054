"""torch.save checkpoints (.pt/.pth/.bin, optionally zstd-compressed), loaded only with weights_only=True.

A pickle can run arbitrary code, so there is deliberately no fallback to a full unpickling load: a file the
restricted unpickler refuses is reported (file + offending global) and never executed.
"""
from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any

import torch
import zstandard

from hybridserve.weights.checkpoint import Checkpoint, CheckpointError
from hybridserve.weights.safetensors_dir import detect_arch, read_json

_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile, DDP
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.")
KOTODAMA_DDV1_BOUNDARIES = [0, 3, 7, 12, 21, 25]


def _refusal_reason(exc: pickle.UnpicklingError) -> str:
    """The useful part of torch's weights_only error, without its advice to retry with weights_only=False."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"disallowed global {found.group(1)}"
    found = re.search(r"(Unsupported [^\n]*)", text)
    if found:
        return found.group(1).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _decompress(path: Path) -> io.BytesIO:
    """Stream-decompress a .zst file into memory (torch.load needs a seekable file)."""
    out = io.BytesIO()
    with path.open("rb") as fh:
        try:
            zstandard.ZstdDecompressor().copy_stream(fh, out)
        except zstandard.ZstdError as exc:
            raise CheckpointError(f"{path}: corrupt zstd stream: {exc}") from exc
    out.seek(0)
    return out


def _strip_prefixes(key: str) -> str:
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def load_torch_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a torch.save state dict (or `{"model": state_dict, ...}` training checkpoint) onto the CPU.

    Keys lose leading `_orig_mod.` / `module.` wrappers; every value must be a tensor.
    """
    path = Path(path)
    try:
        source = _decompress(path) if path.name.endswith(".zst") else path
        obj = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused by torch.load(weights_only=True): {_refusal_reason(exc)}. "
            "The file holds more than tensors and plain containers; it is not loaded because unpickling "
            "it could run code"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint: {exc}") from exc

    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")

    tensors: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: state dict key {key!r} is not a string")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: state dict entry {key!r} is a {type(value).__name__}, not a tensor"
            )
        name = _strip_prefixes(key)
        if name in tensors:
            raise CheckpointError(f"{path}: {key!r} and another key both become {name!r} after prefix stripping")
        tensors[name] = value
    return tensors


def infer_kotodama_config(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """HF-style config for a raw Kotodama training checkpoint, which ships without one.

    Shapes come from the tensors; the rest are the 108M training constants (kotodama.md §4). Block
    boundaries are only known for the 28-layer DD-v1 model; other depths must supply them.
    """
    embed = tensors["embed_tokens.weight"]
    vocab, hidden = embed.shape
    layer_ids = {int(m.group(1)) for key in tensors if (m := _LAYER_KEY.match(key))}
    num_layers = max(layer_ids) + 1
    q_norm = tensors.get("layers.0.attn.q_norm.weight")
    if q_norm is None:
        raise CheckpointError(
            "cannot infer head_dim: no layers.0.attn.q_norm.weight (qk_norm off?); provide a config.json"
        )
    head_dim = q_norm.shape[0]
    attn_res = "layers.0.attn_res_query" in tensors
    config: dict[str, Any] = {
        "model_type": "kotodama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": num_layers,
        "num_attention_heads": tensors["layers.0.attn.q_proj.weight"].shape[0] // head_dim,
        "num_key_value_heads": tensors["layers.0.attn.k_proj.weight"].shape[0] // head_dim,
        "head_dim": head_dim,
        "intermediate_size": tensors["layers.0.ffn.gate_proj.weight"].shape[0],
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "qk_norm": True,
        "attn_res": attn_res,
    }
    if attn_res and num_layers == 28:
        config["attn_res_boundaries"] = list(KOTODAMA_DDV1_BOUNDARIES)
    return config


def _is_raw_kotodama(tensors: dict[str, torch.Tensor]) -> bool:
    return "embed_tokens.weight" in tensors and "layers.0.attn.q_proj.weight" in tensors


def load_torch_checkpoint(path: str | Path, config: dict[str, Any] | None = None) -> Checkpoint:
    """Load a torch checkpoint with its config: a sibling config.json, else `config`.

    For raw Kotodama tensors, values inferred from the shapes fill in whatever the config lacks (all of
    it when there is none), so a bare training checkpoint loads on its own. The tokenizer and generation
    settings are left to the caller (see safetensors_dir.read_sidecars).
    """
    path = Path(path)
    tensors = load_torch_file(path)
    sibling = path.parent / "config.json"
    given = read_json(sibling) if sibling.is_file() else config
    if _is_raw_kotodama(tensors):
        merged = {**infer_kotodama_config(tensors), **(given or {})}
        if merged.get("attn_res") and "attn_res_boundaries" not in merged:
            raise CheckpointError(
                f"{path}: AttnRes checkpoint with {merged['num_hidden_layers']} layers: block boundaries are "
                "only known for 28 layers; set attn_res_boundaries in config.json"
            )
        given = merged
    if given is None:
        raise CheckpointError(
            f"{path}: no config.json next to it and the tensors are not a raw Kotodama checkpoint; "
            "put the model's config.json beside the file"
        )
    return Checkpoint(arch=detect_arch(given), config=given, tensors=tensors, source=str(path))
