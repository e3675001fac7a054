"""Continuous batching with chunked prefill under a per-step token budget.

Each step: running requests first, in admission order (decodes take one token, unfinished prefills
take the next chunk), then waiting requests are admitted while the budget, a free state slot and KV
pages for the whole prompt are available. When a request needs a page and none is free, the newest
running request is preempted: its KV pages and state slot are swapped to host memory and released, and
it resumes first, from exactly where it stopped, when memory frees up (engine/swap.py).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from hybridserve.engine.cache_pools import CachePools
from hybridserve.engine.sequence import Sequence, SeqStatus
from hybridserve.engine.swap import swap_in, swap_out


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new: list[int]         # tokens each sequence feeds this step

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, pools: CachePools, max_num_seqs: int, max_num_batched_tokens: int):
        self.pools = pools
        self.max_num_seqs = max_num_seqs
        self.budget = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.budget
        seqs, counts = [], []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_pending, budget)
            if not self._reserve_pages(seq, seq.num_computed + n):
                continue  # seq itself was preempted
            seqs.append(seq)
            counts.append(n)
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self._admit(seq):
                break
            self.waiting.popleft()
            self.running.append(seq)
            n = min(seq.num_pending, budget)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        return ScheduledBatch(seqs, counts)

    def finish(self, seq: Sequence) -> None:
        """Release everything the request holds; safe to call in any state, more than once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.swapped = None
        seq.status = SeqStatus.FINISHED

    # -- resources ------------------------------------------------------------------------------

    def can_admit(self) -> bool:
        """Whether schedule() would start the head of the queue now."""
        return bool(self.waiting) and len(self.running) < self.max_num_seqs and self._fits(self.waiting[0])

    def reserve_next(self, seqs: list[Sequence]) -> bool:
        """Pages for one more token than each of `seqs` has computed, without preempting anyone: False (and
        nothing allocated) when the free pages do not cover them all."""
        pages = self.pools.pages
        if self.pools.layout.kv is None:
            return True
        size = pages.page_size
        # a row's pages hold its computed tokens, so one more token needs a page only where they are full
        full = [s for s in seqs if s.num_computed >= len(s.pages) * size]
        if not full:
            return True
        need = [pages.pages_for(s.num_computed + 1) - len(s.pages) for s in full]
        if sum(need) > pages.num_free:
            return False
        for s, n in zip(full, need):
            s.pages.extend(pages.allocate(n))
        return True

    def _fits(self, seq: Sequence) -> bool:
        pools = self.pools
        if pools.has_state and pools.slots.num_free == 0:
            return False
        return not pools.layout.kv or pools.pages.pages_for(seq.num_tokens) <= pools.pages.num_free

    def _admit(self, seq: Sequence) -> bool:
        pools = self.pools
        if not self._fits(seq):
            return False
        need = pools.pages.pages_for(seq.num_tokens) if pools.layout.kv else 0
        if need:
            seq.pages = pools.pages.allocate(need)
        if pools.has_state:
            seq.slot = pools.slots.allocate()
        if seq.swapped is not None:
            swap_in(pools, seq.swapped, seq.pages, seq.slot)
            seq.swapped = None
        seq.status = SeqStatus.RUNNING
        return True

    def _reserve_pages(self, seq: Sequence, num_tokens: int) -> bool:
        """Make sure seq owns pages for num_tokens, preempting newer requests if needed."""
        pages = self.pools.pages
        if self.pools.layout.kv is None:
            return True
        need = pages.pages_for(num_tokens) - len(seq.pages)
        while need > pages.num_free:
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        if need > 0:
            seq.pages.extend(pages.allocate(need))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.swapped = swap_out(self.pools, seq.pages, seq.slot)
        self._release(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _release(self, seq: Sequence) -> None:
        if seq.pages:
            self.pools.pages.free(seq.pages)
            seq.pages = []
        if seq.slot:
            self.pools.slots.free(seq.slot)
            seq.slot = 0
