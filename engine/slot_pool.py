"""Per-request state slots. One index per request is valid in every state group's tensor.

Slot 0 is reserved for padding (CUDA-graph pad rows write there). A slot is zeroed when handed out,
so a new request always starts from the zero state, whatever the previous owner left.
"""
from __future__ import annotations

import torch


class SlotPool:
    def __init__(self, num_slots: int, states: dict[str, torch.Tensor]):
        self.num_slots = num_slots              # usable slots, excluding the pad slot
        self.states = states                    # group -> [layers, num_slots + 1, *shape]
        self._free = list(range(num_slots, 0, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise MemoryError("no free state slot")
        slot = self._free.pop()
        for t in self.states.values():
            t[:, slot].zero_()
        return slot

    def free(self, slot: int) -> None:
        if slot:
            self._free.append(slot)
