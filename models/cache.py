"""What a model declares about its per-request memory, and the views of the pools it is handed.

A model never allocates cache memory. It declares a `CacheLayout` once; the engine sizes and owns the
pools, and passes a `CacheView` into every forward call.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class KVSpec:
    """Paged K/V for attention layers: one page holds `page_size` tokens of [num_kv_heads, head_dim]."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class StateSpec:
    """A fixed-size per-request state, replicated over `num_layers` layers. dtype None = model dtype."""

    num_layers: int
    shape: tuple[int, ...]
    dtype: torch.dtype | None = None

    def numel(self) -> int:
        n = self.num_layers
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class CacheLayout:
    kv: KVSpec | None = None
    states: dict[str, StateSpec] = field(default_factory=dict)

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        if self.kv is None:
            return 0
        elt = torch.empty((), dtype=dtype).element_size()
        return 2 * self.kv.num_layers * self.kv.num_kv_heads * self.kv.head_dim * elt

    def state_bytes_per_slot(self, model_dtype: torch.dtype) -> dict[str, int]:
        out = {}
        for name, spec in self.states.items():
            elt = torch.empty((), dtype=spec.dtype or model_dtype).element_size()
            out[name] = spec.numel() * elt
        return out


@dataclass
class CacheView:
    """The pools as the model sees them.

    kv[i] = (k, v) for the i-th attention layer, each [num_pages, page_size, num_kv_heads, head_dim].
    states[group] = tensor [num_layers, num_slots, *shape]; slot 0 is the reserved pad slot.
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    states: dict[str, torch.Tensor]
    page_size: int
