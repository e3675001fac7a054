"""What unused sequences cost a prefill graph: a lone 128-token prompt replayed from a prefill graph of capacity 1
and of 64 sequences (bucket 256; engine/cuda_graphs.py PrefillGraphs), the replay time and the GPU time per kernel
(torch.profiler over 3 replays), with the kernels whose time differs most. The baseline is the capacity-1 graph in
the same process.

Usage (GPU machine): python bench/prefill_capacity.py spartacus,neollm → $OUT/prof_prefill.json
"""
from __future__ import annotations

import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from decode_latency import load_full, time_fn
from hybridserve.engine.cache_pools import CachePools, plan_memory
from hybridserve.engine.cuda_graphs import PrefillGraphs
from hybridserve.engine.model_runner import SeqChunk


def kernel_times(run) -> dict[str, tuple[float, float]]:
    """GPU kernels of one call of `run`: name → (calls, µs), averaged over 3 calls."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            run()
        torch.cuda.synchronize()
    return {e.key[:60]: (e.count / 3, e.device_time_total / 3) for e in prof.key_averages()
            if e.device_type.name == "CUDA"}


def main():
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for arch in (sys.argv[1] if len(sys.argv) > 1 else "spartacus,neollm").split(","):
        model = load_full(arch)
        layout = model.cache_layout()
        pools = CachePools(layout, plan_memory(layout, model.dtype, 2 << 30, 16, 64, 4096), 16, model.dtype,
                           model.device)
        pages = pools.pages.allocate(16) if layout.kv else []
        slot = pools.slots.allocate() if layout.states else 0
        step = [SeqChunk([(7 * i) % 30000 + 1 for i in range(128)], 0, pages, slot, True)]
        res = {}
        for cap in (1, 64):
            graphs = PrefillGraphs(model, pools.view, 256, buckets=(256,), capacities=(cap,))
            graphs.capture()

            def run(graphs=graphs, cap=cap):
                graphs.run(step, (cap, 256))
            res[cap] = (time_fn(run, iters=30, warmup=5), kernel_times(run))
            del graphs, run
            torch.cuda.empty_cache()
        (ms1, k1), (ms64, k64) = res[1], res[64]
        diff = sorted(((k64.get(n, (0, 0))[1] - k1.get(n, (0, 0))[1], n) for n in set(k1) | set(k64)), reverse=True)
        print(f"{arch}: capacity 1 {ms1:.3f} ms, capacity 64 {ms64:.3f} ms")
        for d, n in diff[:10]:
            print(f"   {d:8.1f} us  {n}  capacity 1 {k1.get(n, (0, 0))}  capacity 64 {k64.get(n, (0, 0))}")
        out[arch] = {"S1_ms": ms1, "S64_ms": ms64,
                     "diff_top": [[n, d, k1.get(n, (0, 0)), k64.get(n, (0, 0))] for d, n in diff[:15]]}
        del pools, model
        torch.cuda.empty_cache()
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    with open(os.path.join(out_dir, "prof_prefill.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
