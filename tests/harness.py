"""Drives a model's engine forward over real pools the way the engine does, for parity tests.

Each test feeds chunks of tokens for several sequences in one packed batch and compares the logits of
every fed token against the model's reference forward over the whole sequence.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hybridserve.engine.cache_pools import CachePools, MemoryPlan
from hybridserve.engine.model_runner import SeqChunk, build_meta


@dataclass
class Seq:
    tokens: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    slot: int = 0


class Harness:
    def __init__(self, model, page_size: int = 4, num_pages: int = 256, num_slots: int = 8):
        layout = model.cache_layout()
        dtype = model.dtype
        plan = MemoryPlan(num_pages if layout.kv else 1, num_slots if layout.states else 0, num_slots,
                          layout.kv_bytes_per_token(dtype) * page_size, layout.state_bytes_per_slot(dtype))
        self.model = model
        self.pools = CachePools(layout, plan, page_size, dtype, model.device)

    def new_seq(self) -> Seq:
        s = Seq()
        if self.pools.has_state:
            s.slot = self.pools.slots.allocate()
        return s

    def release(self, s: Seq) -> None:
        self.pools.pages.free(s.pages)
        self.pools.slots.free(s.slot)
        s.pages, s.slot = [], 0

    def book(self, s: Seq, new: list[int]) -> SeqChunk:
        """Append tokens to a sequence and book its pages; returns the chunk that feeds them."""
        start = len(s.tokens)
        s.tokens.extend(new)
        if self.pools.layout.kv:
            need = self.pools.pages.pages_for(len(s.tokens)) - len(s.pages)
            if need > 0:
                s.pages.extend(self.pools.pages.allocate(need))
        return SeqChunk(list(new), start, s.pages, s.slot, True)

    @torch.inference_mode()
    def step(self, feeds: list[tuple[Seq, list[int]]], pad_rows: int = 0) -> list[torch.Tensor]:
        """Feed each (seq, new tokens); returns logits [len(new), V] per feed.

        pad_rows adds CUDA-graph style padding rows: one token each, slot 0, page 0.
        """
        chunks = [self.book(s, new) for s, new in feeds]
        for _ in range(pad_rows):
            chunks.append(SeqChunk([0], 0, [], 0, True))
        meta = build_meta(chunks, self.pools.page_size, self.model.device, all_logits=True)
        logits = self.model.forward(meta, self.pools.view)
        out, i = [], 0
        for _, new in feeds:
            out.append(logits[i:i + len(new)])
            i += len(new)
        return out

    def prefill_then_decode(self, toks: list[int], n_prompt: int) -> torch.Tensor:
        """A new sequence: the first n_prompt tokens as one prefill, then one decode step per token.
        Returns the logits of every token [len(toks), V]."""
        s = self.new_seq()
        got = [self.step([(s, toks[:n_prompt])])[0]]
        for t in toks[n_prompt:]:
            got.append(self.step([(s, [t])])[0])
        return torch.cat(got)

    def live_state(self) -> dict[str, torch.Tensor]:
        """Copies of every state tensor, pad slot excluded."""
        return {g: t[:, 1:].clone() for g, t in self.pools.view.states.items()}


def reference_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model.reference_forward(torch.tensor(tokens, dtype=torch.long, device=model.device))


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> None:
    err = (a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)
    assert err < tol, f"relative error {err:.3e} >= {tol}"
