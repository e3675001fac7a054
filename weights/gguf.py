"""GGUF (llama.cpp) checkpoints → float32 tensors under HF Llama names, config, tokenizer and chat template.

Only `general.architecture == "llama"` is supported: it is what the embedded SmolLM2 model uses, and the same
loader serves any Llama GGUF whose tokenizer `Tokenizer.from_gguf_metadata` can reproduce.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from tqdm import tqdm

from hybridserve.weights.checkpoint import Checkpoint, CheckpointError
from hybridserve.weights.tokenizer import Tokenizer

# GGUF tensor name → HF Llama name ("{i}" is the block index).
_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.")
_PROGRESS_BYTES = 50 * 2**20


class FastGGUFReader(GGUFReader):
    """GGUFReader over a plain ndarray view of its memmap.

    GGUFReader slices its buffer once per metadata item; on an `np.memmap` every slice runs memmap's
    `__array_finalize__`, which makes parsing SmolLM2's 49k-token vocabulary take ~5 s instead of ~1.5 s.
    The view keeps the mapping alive and read-only.
    """

    @property
    def data(self) -> np.ndarray:
        return self._buffer

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._buffer = value.view(np.ndarray)


def permute_for_interleaved(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rotate-half (HF) Q/K rows → the interleaved-pair layout llama.cpp's converter writes to GGUF."""
    out_features = w.shape[0]
    return w.reshape(n_head, 2, out_features // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_from_interleaved(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """GGUF's interleaved-pair Q/K rows → the rotate-half layout our RoPE (and HF's) expects."""
    out_features = w.shape[0]
    return w.reshape(n_head, out_features // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def load_gguf(path: str | os.PathLike, *, progress: bool = True) -> Checkpoint:
    """Read, dequantize to float32 and rename every tensor; build the config and the tokenizer."""
    path = Path(path)
    try:
        reader = FastGGUFReader(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as e:  # GGUFReader reports truncation/corruption as assorted ValueError/IndexError/...
        raise CheckpointError(f"{path.name} ({path.stat().st_size} bytes) is not a readable GGUF file, "
                              f"truncated or corrupt ({type(e).__name__}: {e}) [{path}]") from e

    def value(key: str, default: Any = None) -> Any:
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    arch = value("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    scaling = value("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise CheckpointError(f"{path}: RoPE scaling {scaling!r} is not supported")

    names = {t.name for t in reader.tensors}
    config = _config(path, value, tied="output.weight" not in names, n_vocab=len(value("tokenizer.ggml.tokens", [])))
    expected = _expected_shapes(config)
    unknown = sorted(n for n in names if n not in expected)
    missing = sorted(set(expected) - names)
    if unknown or missing:
        raise CheckpointError(f"{path}: tensors not as a Llama GGUF should have them; "
                              f"unexpected: {unknown[:10]}, missing: {missing[:10]}")

    try:
        tokenizer = Tokenizer.from_gguf_metadata(reader.fields)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e

    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    file_size = path.stat().st_size
    show = progress and (sys.stderr.isatty() or file_size > _PROGRESS_BYTES)
    tensors: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc=f"loading {path.name}", unit="tensor", file=sys.stderr, disable=not show):
        try:
            if t.tensor_type == GGMLQuantizationType.F32:
                array = np.array(t.data, dtype=np.float32)        # copy out of the read-only mapping
            else:
                array = dequantize(t.data, t.tensor_type)
            w = torch.from_numpy(array)
        except Exception as e:
            raise CheckpointError(f"{path}: tensor {t.name} ({t.tensor_type.name}) cannot be read: {e}") from e
        if tuple(w.shape) != expected[t.name]:
            raise CheckpointError(f"{path}: tensor {t.name} has shape {tuple(w.shape)}, "
                                  f"expected {expected[t.name]}")
        if ".attn_q." in t.name:
            w = unpermute_from_interleaved(w, heads)
        elif ".attn_k." in t.name:
            w = unpermute_from_interleaved(w, kv_heads)
        tensors[_hf_name(t.name)] = w

    generation = {"eos_token_id": tokenizer.eos_token_ids, "bos_token_id": tokenizer.bos_token_id}
    return Checkpoint(arch="llama", config=config, tensors=tensors, source=str(path), tokenizer=tokenizer,
                      generation=generation)


def _f32(x: float) -> float:
    """GGUF stores floats as float32: give back the short decimal (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def _config(path: Path, value, *, tied: bool, n_vocab: int) -> dict[str, Any]:
    try:
        hidden = int(value("llama.embedding_length"))
        heads = int(value("llama.attention.head_count"))
        layers = int(value("llama.block_count"))
        ffn = int(value("llama.feed_forward_length"))
    except TypeError:
        raise CheckpointError(f"{path}: GGUF metadata lacks llama.embedding_length / attention.head_count / "
                              f"block_count / feed_forward_length") from None
    head_dim = int(value("llama.attention.key_length", hidden // heads))
    rope_dims = int(value("llama.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise CheckpointError(f"{path}: partial RoPE ({rope_dims} of {head_dim} dims) is not supported")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(value("llama.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rope_theta": _f32(value("llama.rope.freq_base", 10000.0)),
        "rms_norm_eps": _f32(value("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "vocab_size": int(value("llama.vocab_size", n_vocab)),
        "max_position_embeddings": int(value("llama.context_length", 2048)),
        "tie_word_embeddings": tied,
    }


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name → PyTorch [out, in] shape."""
    h, ffn, d = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    shapes = {"token_embd.weight": (config["vocab_size"], h), "output_norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["output.weight"] = (config["vocab_size"], h)
    per_block = {"attn_norm": (h,), "attn_q": (q, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, q),
                 "ffn_norm": (h,), "ffn_gate": (ffn, h), "ffn_up": (ffn, h), "ffn_down": (h, ffn)}
    for i in range(config["num_hidden_layers"]):
        for name, shape in per_block.items():
            shapes[f"blk.{i}.{name}.weight"] = shape
    return shapes


def _hf_name(name: str) -> str:
    m = _BLOCK.match(name)
    if m is None:
        return _NAMES[name]
    i = m.group(1)
    return _NAMES[_BLOCK.sub("blk.{i}.", name, count=1)].format(i=i)
