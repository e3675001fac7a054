"""Preemption by swapping: a preempted request's KV pages and state slot are copied to host memory and
copied back into fresh pages/slot when it is resumed. Nothing is recomputed, so the continuation is
bit-identical to an unpreempted run; the recurrent state (small, fixed) costs one copy each way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridserve.engine.cache_pools import CachePools


@dataclass
class HostCopy:
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per attention layer, [n_pages, page_size, Hkv, D]
    states: dict[str, torch.Tensor]              # per group, [layers, *shape]

    @property
    def num_pages(self) -> int:
        return self.kv[0][0].shape[0] if self.kv else 0

    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv) + sum(s.nbytes for s in self.states.values())


def _to_host(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
    out.copy_(t, non_blocking=True)
    return out


def swap_out(pools: CachePools, pages: list[int], slot: int) -> HostCopy:
    view = pools.view
    idx = torch.tensor(pages, dtype=torch.long, device=view.kv[0][0].device) if pages and view.kv else None
    kv = [(_to_host(k[idx]), _to_host(v[idx])) for k, v in view.kv] if idx is not None else []
    states = {g: _to_host(t[:, slot]) for g, t in view.states.items()} if slot else {}
    if any(t.is_cuda for t in view.states.values()) or (view.kv and view.kv[0][0].is_cuda):
        torch.cuda.current_stream().synchronize()  # the source pages are reused right after this returns
    return HostCopy(kv, states)


def swap_in(pools: CachePools, host: HostCopy, pages: list[int], slot: int) -> None:
    view = pools.view
    if host.kv:
        idx = torch.tensor(pages[:host.num_pages], dtype=torch.long, device=view.kv[0][0].device)
        for (k, v), (hk, hv) in zip(view.kv, host.kv):
            k[idx] = hk.to(k.device, non_blocking=True)
            v[idx] = hv.to(v.device, non_blocking=True)
    for g, t in host.states.items():
        view.states[g][:, slot] = t.to(view.states[g].device, non_blocking=True)
