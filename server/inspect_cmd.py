"""`hybridserve inspect PATH`: what a checkpoint is, whether it matches the model, and what it costs."""
from __future__ import annotations

import torch

from hybridserve.models.registry import bind_checkpoint, resolve
from hybridserve.weights.loader import load_checkpoint


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def inspect_checkpoint(path: str) -> tuple[bool, str]:
    """Returns (matches, report text). Nothing is executed from the checkpoint."""
    ckpt = load_checkpoint(path, progress=False)
    model_cls, _ = resolve(ckpt.arch)
    config, _, report = bind_checkpoint(ckpt, strict=False)
    lines = [f"checkpoint:   {ckpt.source}", f"architecture: {ckpt.arch} ({model_cls.__name__})",
             f"tensors:      {len(ckpt.tensors)} found, {report.num_params:,} parameters matched"]
    lines.append(report.format("tensor check"))
    layout = config.cache_layout()
    dtype = torch.bfloat16
    states = layout.state_bytes_per_slot(dtype)
    lines.append("per-request memory (bf16 activations, fp32 recurrent state):")
    for group, nbytes in states.items():
        spec = layout.states[group]
        lines.append(f"  state {group}: {human(nbytes)} ({spec.num_layers} layers × {list(spec.shape)} "
                     f"{str(spec.dtype or dtype).replace('torch.', '')}), constant in context length")
    kv = layout.kv_bytes_per_token(dtype)
    lines.append(f"  KV cache: {human(kv)} per token" if kv else "  KV cache: none")
    if ckpt.tokenizer is not None:
        lines.append(f"tokenizer:    vocab {ckpt.tokenizer.vocab_size}, eos {ckpt.tokenizer.eos_token_ids}, "
                     f"chat template {'yes' if ckpt.tokenizer.chat_template else 'no'}")
    return report.ok, "\n".join(lines)
