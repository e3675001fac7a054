"""Can a latency-bound kernel ask L2 for the next matmul's weights without slowing the chain it sits in?

The model: a batch-1 decode layer's attention block is a chain of short kernels that leave the memory bus idle
for ~10 µs, then the o projection's GEMV streams its weights. Here the block is one kernel (`_idle_kernel`):
program 0 follows a chain of dependent loads through a 64 MB random cycle (each a likely HBM miss, as the
attention's dependent reads are), and extra programs may issue L2 prefetches of the GEMV's weight
(kernels/l2_prefetch.py). Each case is a CUDA graph of 8 such (block, GEMV) pairs on 8 copies of the weight
(151 MB, past the 50 MB L2, so every pair starts cold), all kernels with programmatic dependent launch as in a
decode step; timed in turn, `--rounds` times. Also timed: the GEMV alone, cold and L2-warm (one copy 8 times),
and the block alone with each prefetch mode; and, for the streamed GEMV's grid settings, a whole layer's four
GEMVs (Llama-3.2-3B shapes, 8 layers' worth of copies) with and without the block between q|k|v and o: what a
latency-bound block between two GEMVs costs beyond its own time. And the o GEMV with its weight held in registers
before the block ends (fused_triton.RESIDENT_AFTER_BLOCK; `--quick` leaves out the prefetch modes and grid
settings): alone, after the block (which releases its launch early, as pdl.EARLY_MIXER's kernels do), and in the
layer; against the streamed GEMV at the same 64-register cap (the `_nreg64` cases).

Writes $OUT/l2_prefetch.json (or bench/results/l2_prefetch.json).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

import decode_latency as dl
from hybridserve.kernels import fused_triton as ft
from hybridserve.kernels import l2_prefetch, pdl

COPIES = 8


@triton.jit
def _idle_kernel(chase_ptr, out_ptr, start, pf_ptr, pf_bytes, STEPS: tl.constexpr, PF_PARTS: tl.constexpr,
                 LANES: tl.constexpr, CHUNK: tl.constexpr, LINES: tl.constexpr, EARLY: tl.constexpr,
                 PDL: tl.constexpr):
    pid = tl.program_id(0)
    if PF_PARTS > 0:
        l2_prefetch.enter(PDL, pid > 0, pf_ptr, pf_bytes, pf_ptr, 0, pid - 1, PF_PARTS, LANES, CHUNK, LINES, EARLY)
    elif PDL:
        pdl.enter(PDL)
    if pid == 0:
        i = start
        for _ in range(STEPS):
            i = tl.load(chase_ptr + i)
        tl.store(out_ptr, i)


def idle(chase, out, start, w, steps, parts=0, chunk=1 << 14, lines=False, early=False, release=False):
    """The block; `release`: it releases the next launch before its wait (as pdl.EARLY_MIXER's kernels)."""
    kw = pdl.launch_kwargs(w.device)
    if release and kw["PDL"]:
        kw["PDL"] = 2
    _idle_kernel[(1 + parts,)](chase, out, start, w, w.numel() * w.element_size(), STEPS=steps, PF_PARTS=parts,
                               LANES=128, CHUNK=chunk, LINES=lines, EARLY=early, num_warps=4, **kw)


def time_graph(g: torch.cuda.CUDAGraph) -> float:
    """µs per (block, GEMV) copy of one replay of `g`."""
    return dl.time_steps(g.replay, iters=100, warmup=10) * 1e3 / COPIES


class _gemv_setting:
    """The streamed GEMV's programs per SM and register cap set while a graph is captured (by default here: 4
    per SM, no cap, as the GEMV ran when this was measured)."""

    def __init__(self, per_sm=None, maxnreg=None):
        self.per_sm, self.maxnreg = per_sm, maxnreg

    def __enter__(self):
        self.saved = ft.gemv_stream_config, ft.GEMV_STREAM_MAXNREG
        base = ft.gemv_stream_config
        if self.per_sm:
            ft.gemv_stream_config = lambda *a, **k: (c[:3] + (self.per_sm,) + c[4:] if (c := base(*a, **k)) else c)
        ft.GEMV_STREAM_MAXNREG = self.maxnreg

    def __exit__(self, *exc):
        ft.gemv_stream_config, ft.GEMV_STREAM_MAXNREG = self.saved


class _resident(_gemv_setting):
    """The GEMV after the block held in registers (fused_triton.RESIDENT_AFTER_BLOCK), with R rows and W warps
    a program, while a graph is captured; the streamed GEMVs capped at 64 registers (their default now), so
    compare with the `_nreg64` cases."""

    def __init__(self, rows=None, warps=None):
        super().__init__(maxnreg=64)
        self.rows, self.warps = rows, warps

    def __enter__(self):
        super().__enter__()
        self.saved_resident = ft.RESIDENT_AFTER_BLOCK, ft.RESIDENT_ROWS, ft.RESIDENT_WARPS
        ft.RESIDENT_AFTER_BLOCK = True
        ft.RESIDENT_ROWS, ft.RESIDENT_WARPS = self.rows or ft.RESIDENT_ROWS, self.warps or ft.RESIDENT_WARPS

    def __exit__(self, *exc):
        ft.RESIDENT_AFTER_BLOCK, ft.RESIDENT_ROWS, ft.RESIDENT_WARPS = self.saved_resident
        super().__exit__(*exc)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=3072, help="Llama-3.2-3B's shapes by default")
    ap.add_argument("--qkv", type=int, default=5120)
    ap.add_argument("--inter", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=10, help="dependent loads in the idle block")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="no prefetch modes, no grid settings but the cap")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    E, inter = args.hidden, args.inter

    def weights(rows, cols):
        return [torch.randn(rows, cols, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(COPIES)]
    ws, qkv, gate_up, down = weights(E, E), weights(args.qkv, E), weights(2 * inter, E), weights(E, inter)
    x = torch.randn(1, E, device=dev, dtype=torch.bfloat16)
    n = 16 << 20
    order = torch.randperm(n, device=dev)
    chase = torch.empty(n, dtype=torch.int32, device=dev)
    chase[order] = torch.roll(order, -1).to(torch.int32)
    starts = [int(order[(k + 1) * (n // (COPIES + 1))]) for k in range(COPIES)]
    out = torch.zeros(1, dtype=torch.int32, device=dev)
    nbytes = ws[0].numel() * 2
    modes = {"none": {}, "bulk_p32": dict(parts=32), "bulk_p132": dict(parts=132),
             "bulk_p132_c64k": dict(parts=132, chunk=1 << 16), "bulk_p528": dict(parts=528),
             "lines_p528": dict(parts=528, chunk=128, lines=True), "bulk_p132_early": dict(parts=132, early=True)}

    def capture(fn, setting=None):
        with setting or _gemv_setting():
            fn()      # compile outside the capture
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
        return g

    def layer(k, with_block, release=False):
        """A Llama layer at batch 1 with the attention as the idle block: qkv, (block), o, gate|up + SiLU·mul,
        down (the residual adds and norms left out). `release`: the block releases the o GEMV's launch before
        its wait; the o GEMV goes through `linear(after_block=True)` (the resident one where it is on)."""
        ft.linear(x, qkv[k])
        if with_block:
            idle(chase, out, starts[k], ws[k], args.steps, release=release)
        ft.linear(x, ws[k], after_block=True)
        ft.linear(ft._gemv(x, None, None, gate_up[k], inter, 0.0, silu_mul=True)[1], down[k])

    graphs = {
        "gemv_cold": capture(lambda: [ft.linear(x, w) for w in ws]),
        "gemv_warm": capture(lambda: [ft.linear(x, ws[0]) for _ in ws]),
    }
    if args.quick:
        modes = {"none": {}}
    for name, kw in modes.items():
        graphs[f"block_{name}"] = capture(lambda kw=kw: [idle(chase, out, s, w, args.steps, **kw)
                                                         for s, w in zip(starts, ws)])
        graphs[f"pair_{name}"] = capture(lambda kw=kw: [(idle(chase, out, s, w, args.steps, **kw), ft.linear(x, w))
                                                        for s, w in zip(starts, ws)])
    # the GEMV's grid around the block: programs per SM (4 by default, 3 of them resident), all 4 resident
    settings = {"": _gemv_setting(), "_per_sm3": _gemv_setting(per_sm=3), "_per_sm2": _gemv_setting(per_sm=2),
                "_nreg64": _gemv_setting(maxnreg=64)}
    if args.quick:
        settings = {k: v for k, v in settings.items() if k in ("", "_nreg64")}
    for tag, setting in settings.items():
        if tag:
            graphs[f"gemv_cold{tag}"] = capture(lambda: [ft.linear(x, w) for w in ws], setting)
            graphs[f"pair_none{tag}"] = capture(lambda: [(idle(chase, out, s, w, args.steps), ft.linear(x, w))
                                                         for s, w in zip(starts, ws)], setting)
        graphs[f"layer_gemvs{tag}"] = capture(lambda: [layer(k, False) for k in range(COPIES)], setting)
        graphs[f"layer_block{tag}"] = capture(lambda: [layer(k, True) for k in range(COPIES)], setting)
    # the o GEMV held in registers before the block ends (fused_triton.RESIDENT_AFTER_BLOCK)
    residents = {"": _resident(), "_r4w2": _resident(rows=4, warps=2), "_r16w8": _resident(rows=16, warps=8)}
    graphs["pair_release_nreg64"] = capture(
        lambda: [(idle(chase, out, s, w, args.steps, release=True), ft.linear(x, w)) for s, w in zip(starts, ws)],
        _gemv_setting(maxnreg=64))
    graphs["layer_block_release_nreg64"] = capture(lambda: [layer(k, True, True) for k in range(COPIES)],
                                                   _gemv_setting(maxnreg=64))
    for tag, setting in residents.items():
        graphs[f"gemv_resident_cold{tag}"] = capture(lambda: [ft.linear(x, w, after_block=True) for w in ws], setting)
        graphs[f"pair_resident{tag}"] = capture(
            lambda: [(idle(chase, out, s, w, args.steps, release=True), ft.linear(x, w, after_block=True))
                     for s, w in zip(starts, ws)], setting)
        graphs[f"layer_resident{tag}"] = capture(lambda: [layer(k, True, True) for k in range(COPIES)], setting)
    graphs["pair_resident_late"] = capture(
        lambda: [(idle(chase, out, s, w, args.steps), ft.linear(x, w, after_block=True)) for s, w in zip(starts, ws)],
        _resident())
    # correctness of the resident GEMV at these shapes
    with _resident():
        for w in (ws[0], qkv[0]):
            want = torch.nn.functional.linear(x.float(), w.float())
            got = ft.linear(x, w, after_block=True).float()
            print("resident vs fp32", tuple(w.shape), float((got - want).abs().max()), float(want.abs().max()))
    runs = {k: [] for k in graphs}
    for _ in range(args.rounds):
        for k, g in graphs.items():
            runs[k].append(time_graph(g))
    med = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
    for k, v in med.items():
        print(f"{k:28s} {v:8.2f} µs")
    floor_us = nbytes / 3.0e12 * 1e6
    layer_bytes = sum(w[0].numel() * 2 for w in (ws, qkv, gate_up, down))
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "o_weight_shape": [E, E], "o_weight_bytes": nbytes, "o_floor_us_at_3TBps": floor_us,
              "layer_weight_bytes": layer_bytes, "layer_floor_us_at_3TBps": layer_bytes / 3.0e12 * 1e6,
              "chase_steps": args.steps, "us_per_copy_median": med, "rounds": runs}
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "l2_prefetch.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
