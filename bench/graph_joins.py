"""A side branch joined back many times, in a small CUDA graph shaped like NanoHammer's decode step: when do the
branch's first kernel and the main chain's second kernel start, after the graph's first kernel?

NanoHammer's step forks its state entries onto a side stream after the first kernel, and each layer's attention
waits for its own entry: one join per layer. In its profile both the side chain's first kernel and the main
chain's second kernel start 12-13 µs after the first (bench/NOTES.md, twenty-sixth session), against 3 µs with
no side stream. bench/graph_branch.py's graph (one fork, one join) showed 3.0 µs with the branch's first kernel
launched without programmatic dependent launch (PDL). This graph adds the joins.

Graphs: a main chain of N one-block Triton kernels on PDL (`_bump`; `main_pdl` False: plain); after its first,
a side branch of G groups of K kernels (`_bump_side`, on PDL or plain); the main chain waits for group g before
its kernel 2 + S·g (`joins` G, S = spacing), or only for the last group before its last kernel (`joins 1`), or
there is no branch (`joins 0`); `side_first_plain`: the branch's first kernel without PDL, the rest on it; a
branch of one group is joined before the main chain's third kernel, which puts it on the critical path (its cost
is the replay's time over the chain without a branch). Timed
back to back (µs a replay) and profiled: per replay, the first side kernel's and the second main kernel's start
after the first main kernel's, the first's after the previous replay's last kernel ended, the replay's span and
the main chain's start-to-start interval from its second kernel on.

Usage (GPU machine): python bench/graph_joins.py → $OUT/graph_joins.json
"""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import torch
import triton
import triton.language as tl
from decode_latency import time_steps
from graph_branch import bump, profiled_kernels
from hybridserve.kernels import pdl

N, G, K, S = 64, 12, 4, 4


@triton.jit
def _bump_side(x_ptr, PDL: tl.constexpr):
    """graph_branch._bump under its own name, so that profiles tell the branch's kernels from the chain's."""
    pdl.enter(PDL)
    offs = tl.arange(0, 1024)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1.0)


def build(joins: int, side_pdl: bool, side_priority: int = 0, main_priority: int = -1, fork_at: int = 1,
          side_first_plain: bool = False, main_pdl: bool = True, groups: int = G, group_kernels: int = K):
    main = torch.zeros(1024, device="cuda")
    side_t = torch.zeros(1024, device="cuda")
    side = torch.cuda.Stream(priority=side_priority)
    s = torch.cuda.Stream(priority=main_priority)
    s.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s):
        for _ in range(2):
            bump(main, main_pdl)
            bump(side_t, side_pdl, _bump_side)
        torch.cuda.synchronize()
        with torch.cuda.graph(g, stream=s):
            cur = torch.cuda.current_stream()
            events = []
            for i in range(N):
                if i == fork_at and joins:
                    side.wait_stream(cur)
                    with torch.cuda.stream(side):
                        for gi in range(groups):
                            for k in range(group_kernels):
                                bump(side_t, side_pdl and not (side_first_plain and gi == k == 0), _bump_side)
                            ev = torch.cuda.Event()
                            ev.record(side)
                            events.append(ev)
                if joins > 1 or groups == 1:
                    for gi, ev in enumerate(events):
                        if i == 2 + S * gi:
                            cur.wait_event(ev)
                if i == N - 1 and events:
                    cur.wait_event(events[-1])
                bump(main, main_pdl)
    torch.cuda.synchronize()
    return g


def starts(g, replays: int = 6) -> dict:
    """Medians over replays queued back to back: the side's first and the main chain's second kernel start after
    the main chain's first, and the first kernel's start after the previous replay's last kernel ended."""
    ev = [e for e in profiled_kernels(g, replays) if "_bump" in e[2]]
    per = len(ev) // replays
    side_first, main_second, after_previous, span, interval = [], [], [], [], []
    for r in range(replays):
        chunk = ev[r * per:(r + 1) * per]
        t0 = chunk[0][0]
        side_first.append(next((t for t, _, n in chunk if "_bump_side" in n), float("nan")) - t0)
        mains = [t for t, _, n in chunk if "_bump_side" not in n]
        main_second.append(mains[1] - t0)
        interval.append((mains[-1] - mains[1]) / (len(mains) - 2))
        span.append(max(e for _, e, _ in chunk) - t0)
        if r:
            after_previous.append(t0 - max(e for _, e, _ in ev[(r - 1) * per:r * per]))
    return {"side_first_us": statistics.median(side_first), "main_second_us": statistics.median(main_second),
            "first_after_previous_end_us": statistics.median(after_previous),
            "profiled_span_us": statistics.median(span), "main_interval_us": statistics.median(interval)}


def main():
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "main_kernels": N,
           "side_groups": G, "side_group_kernels": K, "join_spacing": S, "rows": []}
    cases = [dict(joins=0, side_pdl=False), dict(joins=1, side_pdl=False), dict(joins=G, side_pdl=False),
             dict(joins=1, side_pdl=True), dict(joins=G, side_pdl=True),
             dict(joins=G, side_pdl=False, side_priority=-1),
             dict(joins=G, side_pdl=False, main_priority=0), dict(joins=G, side_pdl=False, fork_at=0),
             dict(joins=1, side_pdl=True, side_first_plain=True), dict(joins=G, side_pdl=True, side_first_plain=True),
             dict(joins=0, side_pdl=False, main_pdl=False), dict(joins=1, side_pdl=False, main_pdl=False),
             # the critical path through the branch: one group joined before the main chain's third kernel
             dict(joins=1, side_pdl=False, groups=1, group_kernels=1),
             dict(joins=1, side_pdl=True, groups=1, group_kernels=1),
             dict(joins=1, side_pdl=False, groups=1, group_kernels=4),
             dict(joins=1, side_pdl=True, groups=1, group_kernels=4),
             dict(joins=1, side_pdl=False, groups=1, group_kernels=4, main_pdl=False),
             dict(joins=1, side_pdl=False, groups=1, group_kernels=4, fork_at=0)]
    graphs = [build(**c) for c in cases]
    us = [[] for _ in cases]
    for _ in range(5):
        for i, g in enumerate(graphs):
            us[i].append(1e3 * time_steps(g.replay))
    for c, g, u in zip(cases, graphs, us):
        row = {**c, "us_per_replay": statistics.median(u), "rounds_us": u, **starts(g)}
        out["rows"].append(row)
        print(f"{json.dumps(c):75} {row['us_per_replay']:7.2f} us a replay; side's first kernel "
              f"{row['side_first_us']:5.1f} us, main's second {row['main_second_us']:5.1f} us after the first; "
              f"the first {row['first_after_previous_end_us']:5.1f} us after the last replay's end; profiled span "
              f"{row['profiled_span_us']:5.1f} us, main kernels every {row['main_interval_us']:4.2f} us",
              flush=True)
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    (out_dir / "graph_joins.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
