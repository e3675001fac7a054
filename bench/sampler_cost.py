"""GPU time of the sampler's parts (engine/sampler.py) per batch size and vocabulary, from torch.profiler:
which op a sampled decode step spends its sampling time on (temperature, min_p / top_k / top_p truncation,
softmax, the draw) in the eager sampler, and in the form the sampler graphs take (`truncation_floor` and the
split-row race / argmax of kernels/sampling_triton.py), against the time of reading the logits once.

Usage (GPU machine): python bench/sampler_cost.py [--vocabs 49152,128256] [--batches 1,32] [--graph-form-only]
[--search-sweep] → $OUT/sampler_cost.json (or bench/results/).
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from gemv_chain import graph_us
from hybridserve.engine.request import SamplingParams
from hybridserve.engine.sampler import Sampler
from hybridserve.kernels import sampling, sampling_triton

CASES = {"temperature": dict(temperature=0.8), "top_p": dict(temperature=0.8, top_p=0.95),
         "top_k": dict(temperature=0.8, top_k=50), "greedy": dict(temperature=0.0)}


def profile_ops(fn, reps: int = 20) -> tuple[float, list]:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    by = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by[e.name[:70]] += e.device_time_total / reps
    ops = sorted(by.items(), key=lambda kv: -kv[1])
    return sum(by.values()), [{"kernel": k, "us": v} for k, v in ops[:8]]


def search_sweep() -> list:
    """The sort-free truncation floor's tiles: candidates per pass, row elements per program, warps."""
    rows = []
    keep = (sampling_triton.SEARCH_C, sampling_triton.SEARCH_BLOCK, sampling_triton.SEARCH_WARPS)
    for V, B in ((128256, 1), (128256, 32), (49152, 1)):
        x = torch.randn(B, V, device="cuda") * 5
        min_p, top_p = torch.zeros(B, device="cuda"), torch.full((B,), 0.95, device="cuda")
        top_k = torch.full((B,), 50, dtype=torch.long, device="cuda")
        want = sampling.truncation_floor(x, min_p, top_k, top_p)
        for c, block, warps in [(c, b, w) for c in (8, 16, 32) for b in (1024, 2048, 4096) for w in (4, 8)]:
            sampling_triton.SEARCH_C, sampling_triton.SEARCH_BLOCK, sampling_triton.SEARCH_WARPS = c, block, warps
            got = sampling_triton.truncation_floor(x, min_p, top_k, top_p)
            assert torch.equal(x >= got[:, None], x >= want[:, None]), (c, block, warps)
            p_us = graph_us(lambda: sampling_triton.truncation_floor(x, min_p, None, top_p))
            kp_us = graph_us(lambda: sampling_triton.truncation_floor(x, min_p, top_k, top_p))
            rows.append({"vocab": V, "batch": B, "C": c, "block": block, "warps": warps, "top_p_graph_us": p_us,
                         "top_k_top_p_graph_us": kp_us})
        sort_us = graph_us(lambda: sampling.truncation_floor(x, min_p, top_k, top_p))
        rows.append({"vocab": V, "batch": B, "sort_graph_us": sort_us})
        best = min((r for r in rows if r.get("vocab") == V and r.get("batch") == B and "C" in r),
                   key=lambda r: r["top_p_graph_us"])
        print(f"search sweep V={V} B={B}: sort {sort_us:.1f} us; best top_p {best['top_p_graph_us']:.1f} us at "
              f"C={best['C']} block={best['block']} warps={best['warps']} (top_k+top_p "
              f"{best['top_k_top_p_graph_us']:.1f})", flush=True)
    sampling_triton.SEARCH_C, sampling_triton.SEARCH_BLOCK, sampling_triton.SEARCH_WARPS = keep
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocabs", default="49152,128256")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--graph-form-only", action="store_true", help="only the sampler graphs' form of the draws")
    ap.add_argument("--search-sweep", action="store_true", help="instead: the truncation search's tile sweep")
    args = ap.parse_args()
    if args.search_sweep:
        out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": search_sweep()}
        out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
        (out_dir / "sampler_search_sweep.json").write_text(json.dumps(out, indent=1))
        return
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    sampler = Sampler()
    for V in map(int, args.vocabs.split(",")):
        for B in map(int, args.batches.split(",")):
            logits = torch.randn(B, V, device="cuda") * 4
            for case, kw in (CASES.items() if not args.graph_form_only else ()):
                params = [SamplingParams(**kw)] * B
                total, ops = profile_ops(lambda: sampler(logits, params, [[]] * B, [[]] * B, [None] * B))
                row = {"vocab": V, "batch": B, "case": case, "gpu_us": total, "read_once_us": B * V * 4 / 3.0e6,
                       "top": ops}
                out["rows"].append(row)
                print(f"V={V:6} B={B:3} {case:11} {total:8.1f} us  " + ", ".join(
                    f"{o['kernel'][:28]} {o['us']:.0f}" for o in ops[:4]), flush=True)
            # the sampler graphs' form of the same draws (engine/sampler_graphs.py): GPU time by op, and the
            # wall time of the same calls replayed as a CUDA graph (the search is ~16 small launches)
            seed = torch.zeros(1, dtype=torch.long, device="cuda")
            inv_t, ones = torch.full((B,), 1 / 0.8, device="cuda"), torch.ones(B, device="cuda")
            min_p, top_p = torch.zeros(B, device="cuda"), torch.full((B,), 0.95, device="cuda")
            top_k = torch.full((B,), 50, dtype=torch.long, device="cuda")
            x = logits * 1.25

            def top_p_with(mod, k=None):
                return lambda: sampling_triton.race(x, ones, seed, mod.truncation_floor(x, min_p, k, top_p))
            search_c = sampling_triton.SEARCH_C
            for case, fn in (("graph_form_temperature", lambda: sampling_triton.race(logits, inv_t, seed)),
                             ("graph_form_top_p_sort", top_p_with(sampling)),
                             ("graph_form_top_p", top_p_with(sampling_triton)),
                             ("graph_form_top_p_c04", top_p_with(sampling_triton)),
                             ("graph_form_top_p_c08", top_p_with(sampling_triton)),
                             ("graph_form_top_p_c16", top_p_with(sampling_triton)),
                             ("graph_form_top_p_c64", top_p_with(sampling_triton)),
                             ("graph_form_top_k_top_p", top_p_with(sampling_triton, top_k)),
                             ("graph_form_greedy", lambda: sampling_triton.argmax(logits))):
                sampling_triton.SEARCH_C = int(case[-2:]) if case[-3:-2] == "c" else search_c
                total, ops = profile_ops(fn)
                wall = graph_us(fn)
                sampling_triton.SEARCH_C = search_c
                out["rows"].append({"vocab": V, "batch": B, "case": case, "gpu_us": total, "graph_us": wall,
                                    "read_once_us": B * V * 4 / 3.0e6, "top": ops})
                print(f"V={V:6} B={B:3} {case:11} {total:8.1f} us GPU, {wall:8.1f} us graph  " + ", ".join(
                    f"{o['kernel'][:28]} {o['us']:.0f}" for o in ops[:4]), flush=True)
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    (out_dir / "sampler_cost.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
