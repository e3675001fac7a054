"""The memory the engine owns for requests: KV pages and state slots, sized from one byte budget."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridserve.engine.page_pool import PagePool
from hybridserve.engine.slot_pool import SlotPool
from hybridserve.models.cache import CacheLayout, CacheView


@dataclass
class MemoryPlan:
    num_pages: int          # including the reserved page 0
    num_slots: int          # usable state slots (pad slot excluded); 0 when the model has no state
    max_concurrency: int
    kv_page_bytes: int
    state_slot_bytes: dict[str, int]

    @property
    def kv_bytes(self) -> int:
        return self.num_pages * self.kv_page_bytes

    @property
    def state_bytes(self) -> int:
        return (self.num_slots + 1) * sum(self.state_slot_bytes.values())


def plan_memory(layout: CacheLayout, dtype: torch.dtype, budget: int, page_size: int,
                max_num_seqs: int, max_model_len: int, num_pages: int | None = None) -> MemoryPlan:
    """Split `budget` bytes between state slots and KV pages; concurrency follows, never a failure.

    State slots are fixed per request, so they are sized first (at most max_num_seqs, at most half the
    budget when the model also needs KV); pages take the rest.
    """
    page_bytes = layout.kv_bytes_per_token(dtype) * page_size
    slot_bytes = layout.state_bytes_per_slot(dtype)
    per_slot = sum(slot_bytes.values())
    if per_slot:
        share = budget // 2 if page_bytes else budget
        slots = max(1, min(max_num_seqs, share // per_slot - 1))
    else:
        slots = 0
    rest = budget - (slots + 1) * per_slot if per_slot else budget
    if page_bytes:
        pages = max(2, rest // page_bytes)
        # no point holding more pages than max_num_seqs full-length sequences can use
        pages = min(pages, max_num_seqs * -(-max_model_len // page_size) + 1)
    else:
        pages = 1
    if num_pages and page_bytes:
        pages = num_pages + 1  # plus the reserved page
    conc = slots if per_slot else max_num_seqs
    if page_bytes:
        conc = min(conc, max_num_seqs, max(1, pages - 1))
    return MemoryPlan(int(pages), int(slots), int(conc), page_bytes, slot_bytes)


class CachePools:
    def __init__(self, layout: CacheLayout, plan: MemoryPlan, page_size: int, dtype: torch.dtype,
                 device: torch.device):
        self.layout, self.plan, self.page_size = layout, plan, page_size
        kv = []
        if layout.kv is not None:
            shape = (plan.num_pages, page_size, layout.kv.num_kv_heads, layout.kv.head_dim)
            kv = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                  for _ in range(layout.kv.num_layers)]
        states = {
            name: torch.zeros((spec.num_layers, plan.num_slots + 1, *spec.shape),
                              dtype=spec.dtype or dtype, device=device)
            for name, spec in layout.states.items()
        }
        self.pages = PagePool(plan.num_pages, page_size)
        self.slots = SlotPool(plan.num_slots, states)
        self.view = CacheView(kv=kv, states=states, page_size=page_size)

    @property
    def has_state(self) -> bool:
        return bool(self.layout.states)

    def state_bytes_per_request(self) -> int:
        return sum(self.plan.state_slot_bytes.values())
