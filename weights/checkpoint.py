"""A loaded checkpoint before it is bound to a model: tensors under the names found on disk."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from hybridserve.weights.tokenizer import Tokenizer


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded. The message names the file and, where known, the tensor."""


@dataclass
class Checkpoint:
    arch: str                          # "llama" | "kotodama" | "spartacus" | "neollm" | "nanohammer"
    config: dict[str, Any]             # HF-style config.json keys (hidden_size, num_hidden_layers, ...)
    tensors: dict[str, torch.Tensor]   # checkpoint tensor names (prefixes like "_orig_mod." stripped)
    source: str                        # path it came from
    tokenizer: "Tokenizer | None" = None
    generation: dict[str, Any] = field(default_factory=dict)  # generation_config.json (eos ids, ...)
