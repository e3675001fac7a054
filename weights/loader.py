"""The one entry point for `--model`: picks the loader from what the path is."""
from __future__ import annotations

from pathlib import Path

from hybridserve.weights.checkpoint import Checkpoint, CheckpointError
from hybridserve.weights.safetensors_dir import TORCH_SUFFIXES, load_hf_dir, read_sidecars
from hybridserve.weights.torch_ckpt import load_torch_checkpoint

EMBEDDED = "embedded"


def load_checkpoint(path: str | Path, *, progress: bool = True) -> Checkpoint:
    """Load `path`: a checkpoint directory, a .gguf, a .safetensors with config.json beside it, a torch
    file (.pt/.pt.zst/.pth/.bin), or "embedded" for the default model shipped as a package.

    The GGUF modules are imported only when needed, so the other formats work without them.
    """
    if str(path) == EMBEDDED:
        from hybridserve.weights.embedded import EMBEDDED_SAMPLING_DEFAULTS, embedded_gguf_path
        from hybridserve.weights.gguf import load_gguf

        ckpt = load_gguf(embedded_gguf_path(), progress=progress)
        ckpt.generation.update(EMBEDDED_SAMPLING_DEFAULTS)
        return ckpt

    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.is_dir():
        return load_hf_dir(p, progress=progress)
    name = p.name.lower()
    if name.endswith(".gguf"):
        from hybridserve.weights.gguf import load_gguf

        return load_gguf(p, progress=progress)
    if name.endswith(".safetensors"):
        if not (p.parent / "config.json").is_file():
            raise CheckpointError(f"{p}: a single .safetensors file needs config.json in the same directory")
        return load_hf_dir(p.parent, progress=progress, weights_file=p)
    if name.endswith(TORCH_SUFFIXES):
        ckpt = load_torch_checkpoint(p, None)
        ckpt.tokenizer, ckpt.generation = read_sidecars(p.parent)
        return ckpt
    raise CheckpointError(
        f"{p}: unknown checkpoint format (expected a directory, .gguf, .safetensors, .pt, .pt.zst, .pth or .bin)"
    )
