"""Async scheduling: a step whose tokens stay on the device until the next step has been launched.

Without it every decode step ends with the host waiting for the step's tokens, then appending, detokenizing and
building the next step's inputs while the GPU idles (0.1-0.5 ms a step, bench/results/engine_decode*.json).
With it the engine launches step N+1 first, its input tokens gathered on the device from step N's, and reads
step N's tokens while N+1 runs: the host's work per token hides behind the GPU's.

The price is one step of lag in what the host knows. A row that step N finishes (a stop token or stop string)
was already fed into step N+1; that extra token is computed and dropped, and its slot and pages are released
after N+1 in stream order, so a later owner's writes land after it. Rows that finish by length are known in
advance and left out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridserve.engine.sequence import Sequence


@dataclass
class InFlight:
    """A launched step: its rows and their tokens, on the device and (once `done` fires) in pinned memory."""

    seqs: list[Sequence]
    tokens: torch.Tensor                # [B] on the device; valid until a later step's replay overwrites it
    host: torch.Tensor                  # [B] the host copy (the same tensor on a CPU engine)
    done: torch.cuda.Event | None

    def read(self) -> list[int]:
        """The tokens, waiting for the step to finish."""
        if self.done is not None:
            self.done.synchronize()
        return self.host.tolist()


class TokenReadback:
    """Device-to-host copies of launched steps' tokens into two pinned buffers used in turn: step N+1 copies into
    one while the host reads step N's from the other (read before N+2 takes it back)."""

    def __init__(self, max_rows: int, device: torch.device):
        self.device = device
        on_gpu = device.type == "cuda"
        self.buffers = [torch.empty(max_rows, dtype=torch.long, pin_memory=True) for _ in range(2)] if on_gpu else []
        self.events = [torch.cuda.Event(), torch.cuda.Event()] if on_gpu else []
        self.turn = 0

    def start(self, seqs: list[Sequence], tokens: torch.Tensor) -> InFlight:
        """Enqueue the copy of `tokens` (this step's int64 ids, one per row of `seqs`) behind the step."""
        if self.device.type != "cuda":
            return InFlight(seqs, tokens, tokens, None)
        i, self.turn = self.turn, self.turn ^ 1
        host = self.buffers[i][:len(seqs)]
        host.copy_(tokens, non_blocking=True)
        self.events[i].record()
        return InFlight(seqs, tokens, host, self.events[i])
