"""One request's life inside the engine: its tokens, how far the cache has consumed them, what it owns."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from hybridserve.engine.request import SamplingParams


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0              # tokens already folded into KV pages / the state slot
    pages: list[int] = field(default_factory=list)
    slot: int = 0                      # state slot (0 = none held)
    status: SeqStatus = SeqStatus.WAITING
    generator: torch.Generator | None = None
    detokenizer: Any = None
    stop_ids: frozenset[int] = frozenset()  # eos + stop_token_ids, checked after sampling
    device_from: int = 0               # outputs after which its tokens may stay on the device (sampler.device_from)
    swapped: Any = None                # HostCopy of pages + slot while preempted
    arrival: float = field(default_factory=time.monotonic)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens not yet in the cache (the whole prompt at first, then the last sampled token)."""
        return self.num_tokens - self.num_computed

    def token_slice(self, start: int, end: int) -> list[int]:
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:
            return self.output_ids[start - p:end - p]
        return self.prompt_ids[start:] + self.output_ids[:end - p]
