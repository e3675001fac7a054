"""Spartacus' batch-1 layer chain (16 × qkvz, recurrence, o, gate_up + SiLU·mul, down, then the head) as one
CUDA graph, with the recurrence in its own kernel after the qkvz GEMV or inside it (kernels/monoid_triton.py
`projection_decode`, under its knobs), timed in turn; plus the chain with no recurrence at all (o reads v
straight from the projection) as the bound, and each kernel's registers per thread (residency).

Usage (GPU machine): python bench/projection_chain.py [--rounds 3] → $OUT/projection_chain.json (or bench/results/).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import decode_latency as dl
import torch
from gemv_chain import HIDDEN, chain_triton, copy_bandwidth, weights

from hybridserve.engine import cuda_graphs
from hybridserve.kernels import fused_triton as ft
from hybridserve.kernels import monoid_triton as mt

H, D = 32, 64
VARIANTS = {            # name: monoid_triton knobs
    "two_kernels": {"PROJECTION_FUSED": False},
    "fused_p16": {},
    "fused_p12": {"PROJECTION_PROGRAMS": 12},
    "fused_early_state": {"PROJECTION_EARLY_STATE": True},
    "fused_maxnreg64": {"PROJECTION_MAXNREG": 64},
    "fused_maxnreg80": {"PROJECTION_MAXNREG": 80},
}


def chain_monoid(layers, head, h, norms, pool, slots):
    delta = None
    for i, lw in enumerate(layers):
        h, o = mt.projection_decode(h, delta, lw["n1"], lw["qkvz"], *norms, pool[i], slots)
        h, g = ft.add_norm_linear_silu_mul(h, ft.linear(o.reshape(1, -1), lw["o"]), lw["n2"], lw["gate_up"], 1e-5)
        delta = ft.linear(g, lw["down"])
    return ft.add_norm_linear(h, delta, layers[0]["n1"], head, 1e-5, out_dtype=torch.float32)[1]


def capture(fn):
    return cuda_graphs.capture(fn, None, torch.cuda.Stream())[0]


def time_graph(g, iters=200, warmup=50) -> float:
    return dl.time_steps(g.replay, iters, warmup)


def registers(fn) -> list[dict]:
    """(registers, spills) of each compiled specialisation of a Triton kernel."""
    out = []
    for cache in fn.device_caches.values():
        kernels = cache[0] if isinstance(cache, tuple) else cache
        for k in kernels.values():
            out.append({"n_regs": getattr(k, "n_regs", None), "n_spills": getattr(k, "n_spills", None),
                        "num_warps": getattr(k.metadata, "num_warps", None)})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth()
    layers, head = weights()
    norms = ((torch.rand(D, device="cuda") + 0.5) * D ** -0.5, (torch.rand(D, device="cuda") + 0.5).to(torch.bfloat16),
             torch.randn(H * D, device="cuda"), H, D, 1e-5, "sigmoid")
    pool = torch.randn(len(layers), 4, H, D, D, device="cuda") * 0.1
    slots = torch.tensor([1], device="cuda")
    h = torch.randn(1, HIDDEN, device="cuda").to(torch.bfloat16)
    graphs = {"no_recurrence": capture(lambda: chain_triton(layers, head, h))}
    defaults = {k: getattr(mt, k) for k in ("PROJECTION_FUSED", "PROJECTION_PROGRAMS", "PROJECTION_EARLY_STATE",
                                             "PROJECTION_MAXNREG")}
    for name, knobs in VARIANTS.items():
        for k, v in knobs.items():
            setattr(mt, k, v)
        try:
            graphs[name] = capture(lambda: chain_monoid(layers, head, h, norms, pool, slots))
        finally:
            for k, v in defaults.items():
                setattr(mt, k, v)
    runs = {name: [] for name in graphs}
    for _ in range(args.rounds):
        for name, g in graphs.items():
            runs[name].append(time_graph(g))
    nbytes = sum(t.numel() * t.element_size() for lw in layers for t in lw.values()) + head.numel() * 2
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bandwidth_Bps": bw,
           "weights_bytes": nbytes, "floor_ms": nbytes / bw * 1e3,
           "ms": {k: sorted(v)[len(v) // 2] for k, v in runs.items()}, "rounds": runs,
           "registers": {"projection_decode": registers(mt._projection_decode_kernel),
                         "fused_decode": registers(mt._fused_decode_kernel),
                         "gemv_stream": registers(ft._gemv_stream_kernel)}}
    for k, v in res["ms"].items():
        print(f"{k:20} {v:.4f} ms  x{v / res['floor_ms']:.3f} floor", flush=True)
    print(json.dumps(res["registers"]), flush=True)
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    (out / "projection_chain.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
