"""Hugging Face style checkpoint directories: config.json + safetensors (single or sharded) + tokenizer files.

Every safetensors header is checked against the file size before any tensor is read, so a truncated
download fails with the file and the first tensor whose bytes are missing instead of a bare Rust error
(or, worse, a half-loaded model).
"""
from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from hybridserve.weights.checkpoint import Checkpoint, CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".pt.zst", ".pth.zst", ".bin.zst")
PROGRESS_MIN_BYTES = 50 * 1024 * 1024
# safetensors itself refuses headers above 100 MB; anything larger is a corrupt length field.
MAX_HEADER_BYTES = 100 * 1024 * 1024

_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}

# (model_type, architectures entry) -> arch. Kotodama is detected first, by its attn_res keys.
_ARCHES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "kotodama": ("kotodama", None),
    "spartacus": ("spartacus", "MonoidForCausalLM"),
    "neollm": ("neollm", "NeoLLMForCausalLM"),
    "nanohammer": ("nanohammer", "NanoHammerForCausalLM"),
}


def detect_arch(config: dict[str, Any]) -> str:
    """Pick the architecture from config.json. `architectures` beats `model_type` because custom models
    (NanoHammer) may keep a base model_type while naming their own class."""
    if config.get("model_type") == "kotodama" or "attn_res" in config or "attn_res_boundaries" in config:
        return "kotodama"
    classes = config.get("architectures") or []
    for arch, (_, cls) in _ARCHES.items():
        if cls is not None and cls in classes:
            return arch
    for arch, (model_type, _) in _ARCHES.items():
        if config.get("model_type") == model_type:
            return arch
    supported = ", ".join(
        f"{arch} (model_type {mt!r}" + (f" / {cls})" if cls else ")") for arch, (mt, cls) in _ARCHES.items()
    )
    raise CheckpointError(
        f"unsupported architecture: model_type={config.get('model_type')!r}, architectures={classes!r}; "
        f"supported: {supported}"
    )


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object file, turning parse errors into a CheckpointError that names the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_sidecars(directory: Path) -> tuple[Any, dict[str, Any]]:
    """The tokenizer (None without tokenizer.json) and generation_config.json ({} without one) of a directory."""
    tokenizer = None
    if (directory / "tokenizer.json").is_file():
        # Imported here so checkpoints without a tokenizer never need the tokenizer module.
        from hybridserve.weights.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_hf_dir(directory)
    gen_path = directory / "generation_config.json"
    generation = read_json(gen_path) if gen_path.is_file() else {}
    return tokenizer, generation


@dataclass(frozen=True)
class _TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


def read_safetensors_header(path: Path) -> dict[str, _TensorInfo]:
    """Parse and check a safetensors header without touching tensor data.

    Fails, naming the file, on a bad header and, naming the first tensor (in file order) whose bytes lie
    past the end of the file, on truncation.
    """
    size = path.stat().st_size
    with path.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, no header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len == 0 or header_len > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: corrupt safetensors header length {header_len}")
        if 8 + header_len > size:
            raise CheckpointError(
                f"{path}: truncated: header needs {8 + header_len} bytes, file has {size}"
            )
        raw = fh.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: not a JSON object")

    data_start = 8 + header_len
    infos: dict[str, _TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            valid = (
                all(isinstance(d, int) and d >= 0 for d in shape)
                and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end
            )
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name!r}: {entry!r}")
        itemsize = _DTYPE_BYTES.get(dtype)
        if itemsize is not None and end - begin != itemsize * _numel(shape):
            raise CheckpointError(
                f"{path}: tensor {name!r} ({dtype} {list(shape)}) has {end - begin} bytes in the header, "
                f"expected {itemsize * _numel(shape)}"
            )
        infos[name] = _TensorInfo(dtype, shape, data_start + begin, data_start + end)

    for name, info in sorted(infos.items(), key=lambda kv: kv[1].begin):
        if info.end > size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} needs bytes {info.begin}..{info.end}, file has {size} bytes"
            )
    return infos


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _plan_shards(directory: Path) -> dict[Path, dict[str, _TensorInfo]]:
    """Validate model.safetensors.index.json against its shards: every shard present, every tensor found."""
    index_path = directory / INDEX_FILE
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: missing or empty 'weight_map'")
    shards: dict[Path, dict[str, _TensorInfo]] = {}
    for shard_name in sorted(set(weight_map.values())):
        shard = directory / shard_name
        if not shard.is_file():
            listed = sorted(t for t, s in weight_map.items() if s == shard_name)
            raise CheckpointError(
                f"{index_path}: shard {shard_name!r} is missing ({len(listed)} tensors listed in it, "
                f"e.g. {listed[0]!r})"
            )
        shards[shard] = read_safetensors_header(shard)
    owner: dict[str, Path] = {}
    for shard, infos in shards.items():
        for tensor in infos:
            if tensor in owner:
                raise CheckpointError(f"{shard}: tensor {tensor!r} is also stored in {owner[tensor]}")
            owner[tensor] = shard
    for tensor, shard_name in weight_map.items():
        if tensor not in shards[directory / shard_name]:
            raise CheckpointError(
                f"{directory / shard_name}: tensor {tensor!r} is listed in {INDEX_FILE} but not in the shard"
            )
    return shards


def _load_safetensors(files: dict[Path, dict[str, _TensorInfo]], progress: bool) -> dict[str, torch.Tensor]:
    """Read every tensor of already-validated files, keeping the stored dtype."""
    total = sum(info.end - info.begin for infos in files.values() for info in infos.values())
    tensors: dict[str, torch.Tensor] = {}
    with tqdm(
        total=total, unit="B", unit_scale=True, file=sys.stderr, desc="loading weights",
        disable=not progress or total <= PROGRESS_MIN_BYTES,
    ) as bar:
        for path, infos in files.items():
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                for name, info in infos.items():
                    tensors[name] = fh.get_tensor(name)
                    bar.update(info.end - info.begin)
    return tensors


def load_hf_dir(path: str | Path, *, progress: bool = True, weights_file: str | Path | None = None) -> Checkpoint:
    """Load a checkpoint directory.

    Weights are, in order of preference: `weights_file` (one named safetensors file in the directory),
    model.safetensors, the shards of model.safetensors.index.json, the only *.safetensors file, and
    last the only torch file (.pt/.pt.zst/.bin/...), handed to the torch loader, which infers a Kotodama
    config when config.json is absent. Safetensors come first because they cannot carry code.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")

    others = sorted(directory.glob("*.safetensors"))
    if weights_file is None and not (directory / SINGLE_FILE).is_file() and not (directory / INDEX_FILE).is_file() \
            and len(others) != 1:
        torch_files = sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(TORCH_SUFFIXES))
        if len(torch_files) == 1 and not others:
            # Imported here: torch_ckpt imports detect_arch/read_json from this module.
            from hybridserve.weights.torch_ckpt import load_torch_checkpoint

            ckpt = load_torch_checkpoint(torch_files[0], None)
            ckpt.tokenizer, ckpt.generation = read_sidecars(directory)
            return ckpt
        found = ", ".join(p.name for p in others + torch_files) or "none"
        raise CheckpointError(
            f"{directory}: cannot tell which weights to load (no {SINGLE_FILE} or {INDEX_FILE}; "
            f"candidates: {found}); pass one file explicitly"
        )

    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: config.json is missing (needed for a safetensors checkpoint)")
    config = read_json(config_path)
    arch = detect_arch(config)

    if weights_file is not None:
        single = directory / Path(weights_file).name
        files = {single: read_safetensors_header(single)}
    elif (directory / SINGLE_FILE).is_file():
        files = {directory / SINGLE_FILE: read_safetensors_header(directory / SINGLE_FILE)}
    elif (directory / INDEX_FILE).is_file():
        files = _plan_shards(directory)
    else:
        files = {others[0]: read_safetensors_header(others[0])}

    tensors = _load_safetensors(files, progress)
    tokenizer, generation = read_sidecars(directory)
    return Checkpoint(
        arch=arch, config=config, tensors=tensors, source=str(directory),
        tokenizer=tokenizer, generation=generation,
    )
