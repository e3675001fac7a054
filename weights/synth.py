"""Synthetic checkpoints in the real on-disk formats: random weights of the real shapes.

`write_synthetic(arch, size, out)` writes config.json + model.safetensors (Kotodama: a zstd-compressed
`torch.save` training checkpoint, as it ships) + the SmolLM2 tokenizer files from the embedded GGUF, so
`hybridserve serve --model DIR` serves it. Ids above the tokenizer's vocabulary are simply never produced
by the tokenizer; the embedding keeps the architecture's real vocabulary size.
"""
from __future__ import annotations

import importlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import torch

# arch -> "module:function" returning (config dict, tensors under checkpoint names)
GENERATORS = {
    "llama": "hybridserve.weights.synth:synth_llama",
    "kotodama": "hybridserve.weights.synth:synth_kotodama",
    "spartacus": "hybridserve.weights.spartacus_map:synth_spartacus",
    "neollm": "hybridserve.weights.neollm_map:synth_neollm",
    "nanohammer": "hybridserve.weights.nanohammer_map:synth_nanohammer",
}

_LLAMA = {  # full = the embedded SmolLM2-135M shapes
    "full": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                 max_position_embeddings=8192),
    "tiny": dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                 max_position_embeddings=2048),
    # larger members of the family, benchmarks only: the SmolLM2-1.7B shapes (no GQA), and the Llama-3.2-3B
    # shapes (GQA 3:1, a 128k vocabulary, llama3 RoPE scaling) with the context capped at 8k like the others
    # (a decode graph's block table is as wide as the context)
    "1.7b": dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                 num_attention_heads=32, num_key_value_heads=32, head_dim=64, rope_theta=130000.0,
                 max_position_embeddings=8192),
    "3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
               num_attention_heads=24, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
               max_position_embeddings=8192,
               rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}
_KOTODAMA = {  # full = the 108M of specs/kotodama.md §4
    "full": dict(vocab_size=49152, hidden_size=512, intermediate_size=1408, num_hidden_layers=28,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                 attn_res_boundaries=[0, 3, 7, 12, 21, 25]),
    "tiny": dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, attn_res_boundaries=[0, 2]),
    # the configuration class's defaults (specs/kotodama.md §4), i.e. the 3B sibling; benchmarks only
    "3b": dict(vocab_size=49152, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
               num_attention_heads=24, num_key_value_heads=8, head_dim=128,
               attn_res_boundaries=[0, 3, 7, 12, 21, 25]),
}


def _dense(shape, g, dtype) -> torch.Tensor:
    return (torch.randn(shape, generator=g) * shape[-1] ** -0.5).to(dtype)


def _llama_tensors(c: dict, g, dtype, hf_names: bool) -> dict[str, torch.Tensor]:
    D, I, H, K, hd, V = (c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
                         c["num_key_value_heads"], c["head_dim"], c["vocab_size"])
    if hf_names:
        p, n = "model.", {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                          "attn": "self_attn", "ffn": "mlp"}
    else:
        p, n = "", {"attn_norm": "attn_norm", "ffn_norm": "ffn_norm", "attn": "attn", "ffn": "ffn"}
    ones = lambda d: (1 + 0.05 * torch.randn(d, generator=g)).to(dtype)  # noqa: E731
    t = {p + "embed_tokens.weight": (torch.randn(V, D, generator=g) * D ** -0.5).to(dtype), p + "norm.weight": ones(D)}
    for i in range(c["num_hidden_layers"]):
        L = f"{p}layers.{i}."
        t[L + n["attn_norm"] + ".weight"] = ones(D)
        t[L + n["ffn_norm"] + ".weight"] = ones(D)
        for x, rows in (("q", H * hd), ("k", K * hd), ("v", K * hd)):
            t[L + f"{n['attn']}.{x}_proj.weight"] = _dense((rows, D), g, dtype)
        t[L + f"{n['attn']}.o_proj.weight"] = _dense((D, H * hd), g, dtype)
        t[L + f"{n['ffn']}.gate_proj.weight"] = _dense((I, D), g, dtype)
        t[L + f"{n['ffn']}.up_proj.weight"] = _dense((I, D), g, dtype)
        t[L + f"{n['ffn']}.down_proj.weight"] = _dense((D, I), g, dtype)
        if c.get("qk_norm"):
            t[L + "attn.q_norm.weight"], t[L + "attn.k_norm.weight"] = ones(hd), ones(hd)
        if c.get("attn_res"):
            for r in ("attn_res", "mlp_res"):
                t[L + r + "_query"] = (0.1 * torch.randn(D, generator=g)).to(dtype)
                t[L + r + "_norm.weight"] = ones(D)
    if c.get("attn_res"):
        t["final_res_query"] = (0.1 * torch.randn(D, generator=g)).to(dtype)
        t["final_res_norm.weight"] = ones(D)
    return t


def synth_llama(size: str, seed: int = 0) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    dims = _LLAMA[size]
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "rms_norm_eps": 1e-5,
              "tie_word_embeddings": True, "torch_dtype": "float32" if size == "tiny" else "bfloat16", **dims}
    dtype = torch.float32 if size == "tiny" else torch.bfloat16
    return config, _llama_tensors(config, torch.Generator().manual_seed(seed), dtype, hf_names=True)


def synth_kotodama(size: str, seed: int = 0) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    dims = _KOTODAMA[size]
    config = {"model_type": "kotodama", "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "max_position_embeddings": 4096, "tie_word_embeddings": True, "qk_norm": True, "attn_res": True,
              **dims}
    dtype = torch.float32 if size == "tiny" else torch.bfloat16
    tensors = _llama_tensors(config, torch.Generator().manual_seed(seed), dtype, hf_names=False)
    return config, tensors


def _write_tokenizer(out: Path) -> None:
    """The SmolLM2 tokenizer and chat template, as an HF tokenizer directory."""
    from hybridserve.weights.embedded import embedded_gguf_path
    from hybridserve.weights.gguf import FastGGUFReader
    from hybridserve.weights.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_metadata(FastGGUFReader(str(embedded_gguf_path())))
    tok.hf_tokenizer.save(str(out / "tokenizer.json"))
    inv = {i: s for s, i in tok.special_tokens.items()}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": tok.chat_template, "bos_token": None, "add_bos_token": False,
        "eos_token": inv.get(tok.eos_token_ids[0]), "pad_token": inv.get(tok.eos_token_ids[0]),
    }, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": tok.eos_token_ids}))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def write_synthetic(arch: str, size: str, out: str | Path, seed: int = 0, tokenizer_from: Path | None = None) -> Path:
    """A random-weight checkpoint of `arch` in its real on-disk format, with the SmolLM2 tokenizer files: derived
    from the embedded GGUF, or copied from `tokenizer_from` (a directory an earlier call wrote, for machines
    without the embedded package)."""
    if arch not in GENERATORS:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(GENERATORS)}")
    if size not in ("tiny", "full"):
        raise ValueError("size must be tiny or full")
    mod, fn = GENERATORS[arch].split(":")
    config, tensors = getattr(importlib.import_module(mod), fn)(size, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    if arch == "kotodama":  # shipped as a compressed training checkpoint, compile prefix and all
        import zstandard

        buf = io.BytesIO()
        torch.save({"model": {"_orig_mod." + k: v for k, v in tensors.items()}, "step": 0}, buf)
        (out / f"kotodama-{size}.pt.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(buf.getvalue()))
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
    if tokenizer_from is None:
        _write_tokenizer(out)
    else:
        for name in TOKENIZER_FILES:
            shutil.copyfile(Path(tokenizer_from) / name, out / name)
    return out
