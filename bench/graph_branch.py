"""What a second stream inside a CUDA graph costs at the graph's start: a chain of small kernels captured on one
stream, against the same chain with a side branch forked from it (as NanoHammer's state entries are), timed back
to back and profiled (the gap from the graph's first kernel to its second).

Graphs (each kernel adds 1 to a small tensor, ~2 µs; torch's kernels, or a Triton kernel launched with
programmatic dependent launch as the decode kernels are, `_pdl`):
- linear: N kernels in a row;
- fork_after_1: the same, with a side branch of M kernels forked after the first and joined before the last;
- fork_first: the side branch forked before the first kernel;
- fork_after_1_late_join: forked after the first, joined at the end of the graph;
- fork_after_1_side_plain (PDL only): the side branch's first kernel launched without it;
- `_hi`: captured on a stream of the highest priority (as the decode graphs are: engine/cuda_graphs.py
  CAPTURE_PRIORITY), the side stream at the default one; `_both_hi`: the side stream at the highest too.

The gaps are read from a profile, which moves a two-stream graph's start by 12-17 µs that timed replays do not pay
(bench/graph_joins.py); the timed µs a replay are the cost.

Usage (GPU machine): python bench/graph_branch.py → $OUT/graph_branch.json
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl
from torch.profiler import ProfilerActivity, profile

from decode_latency import time_steps
from hybridserve.kernels import pdl

N, M = 60, 12


@triton.jit
def _bump(x_ptr, PDL: tl.constexpr):
    pdl.enter(PDL)
    offs = tl.arange(0, 1024)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1.0)


def bump(x: torch.Tensor, with_pdl: bool, kernel=_bump) -> None:
    """One ~2 µs kernel adding 1 to x's first 1024 elements, on PDL or not; `kernel`: another kernel of the same
    signature (bench/graph_joins.py tells its branch apart in profiles by the name)."""
    if with_pdl:
        kernel[(1,)](x, **pdl.launch_kwargs(x.device))
    else:
        kernel[(1,)](x, PDL=False)


def build(kind: str):
    priority, side_priority = 0, 0
    if kind.endswith("_both_hi"):
        priority = side_priority = -1
    elif kind.endswith("_hi"):
        priority = -1
    kind = kind.removesuffix("_both_hi").removesuffix("_hi")
    use_pdl = kind.endswith("_pdl")
    kind = kind.removesuffix("_pdl")
    plain_side = kind.endswith("_side_plain")
    kind = kind.removesuffix("_side_plain")

    def add(x, first_of_side=False):
        if use_pdl:
            bump(x, not (plain_side and first_of_side))
        else:
            x.add_(1)

    main = torch.zeros(1024, device="cuda")
    side_t = torch.zeros(1024, device="cuda")
    side = torch.cuda.Stream(priority=side_priority)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream(priority=priority)
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):      # warm-up outside the capture
            add(main)
            add(main, True)
        torch.cuda.synchronize()
        with torch.cuda.graph(g, stream=s):
            cur = torch.cuda.current_stream()
            fork_at = {"linear": None, "fork_after_1": 1, "fork_first": 0, "fork_after_1_late_join": 1}[kind]
            join_at = N - 1 if kind != "fork_after_1_late_join" else N
            for i in range(N + 1):
                if i == fork_at:
                    side.wait_stream(cur)
                    with torch.cuda.stream(side):
                        for j in range(M):
                            add(side_t, j == 0)
                if fork_at is not None and i == join_at:
                    cur.wait_stream(side)
                if i < N:
                    add(main)
    torch.cuda.synchronize()
    return g


def profiled_kernels(g, replays: int = 6) -> list[tuple[float, float, str]]:
    """(start, end, name) of every kernel of `replays` replays queued back to back under the profiler, in start
    order, after ten unprofiled ones."""
    for _ in range(10):
        g.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            g.replay()
        torch.cuda.synchronize()
    return sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                  if e.device_type == torch.autograd.DeviceType.CUDA)


def first_gaps(g, replays: int = 6) -> list[float]:
    """Start of the graph's second kernel minus the start of its first, per replay (back to back)."""
    starts = [t for t, _, _ in profiled_kernels(g, replays)]
    per = len(starts) // replays
    return [starts[i * per + 1] - starts[i * per] for i in range(replays)]


def main():
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "kernels": N, "side_kernels": M,
           "rows": []}
    kinds = ("linear", "fork_after_1", "fork_first", "fork_after_1_late_join")
    pdl_kinds = tuple(k + "_pdl" for k in kinds + ("fork_after_1_side_plain",))
    graphs = {k: build(k) for k in kinds + pdl_kinds + tuple(k + p for k in ("linear_pdl", "fork_after_1_pdl",
                                                                              "fork_after_1_side_plain_pdl")
                                                             for p in ("_hi", "_both_hi"))}
    ms = {k: [] for k in graphs}
    for _ in range(5):
        for k, g in graphs.items():
            ms[k].append(time_steps(g.replay))
    for k, g in graphs.items():
        row = {"graph": k, "us_per_replay": 1e3 * sorted(ms[k])[2], "rounds_us": [1e3 * x for x in ms[k]],
               "first_to_second_kernel_us": first_gaps(g)}
        out["rows"].append(row)
        print(f"{k:24} {row['us_per_replay']:7.2f} us a replay; first to second kernel "
              + " ".join(f"{x:.1f}" for x in row["first_to_second_kernel_us"]), flush=True)
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    (out_dir / "graph_branch.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
