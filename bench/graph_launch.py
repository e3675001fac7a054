"""How much of a batch-1 decode step is the graph's launch: the step's CUDA graph (bench/decode_latency.py's)
timed three ways in one run.

- isolated: CUDA events around one replay, the GPU idle before it (what decode_latency reports; also what
  an engine step sees when it waits for each step's token before launching the next);
- launch hidden: the same, but the stream first runs a ~0.5 ms spin kernel, so the host's launch work and
  the graph's start-up finish while the GPU is busy; the events then bracket only the graph's execution;
- back to back: 20 replays between two events, per replay (launches overlap the previous replay).
Also the host time of the replay call itself, and the same for PDL off.

Usage (GPU machine): python bench/graph_launch.py [--archs spartacus,kotodama] → $OUT/graph_launch.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from decode_latency import PAGE, Setup, load_full, set_pdl
from hybridserve.engine.cuda_graphs import DecodeGraphs


def timings(replay, n: int = 100) -> dict:
    for _ in range(30):
        replay()
    torch.cuda.synchronize()
    iso, hidden, host = [], [], []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        t = time.perf_counter()
        replay()
        host.append(1e6 * (time.perf_counter() - t))
        b.record()
        b.synchronize()
        iso.append(1e3 * a.elapsed_time(b))
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1_000_000)            # ~0.5 ms of spinning on the stream
        a.record()
        replay()
        b.record()
        b.synchronize()
        hidden.append(1e3 * a.elapsed_time(b))
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(20):
        replay()
    b.record()
    b.synchronize()
    return {"isolated_us": statistics.median(iso), "launch_hidden_us": statistics.median(hidden),
            "back_to_back_us": 1e3 * a.elapsed_time(b) / 20, "host_replay_call_us": statistics.median(host)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="spartacus,kotodama")
    args = ap.parse_args()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for arch in args.archs.split(","):
        model = load_full(arch)
        s = Setup(model, 1, 128)
        width = max(s.pages_per_seq, -(-model.max_model_len // PAGE))
        for pdl_on in (True, False):
            set_pdl(pdl_on)
            graphs = DecodeGraphs(model, s.pools.view, 1, width, sizes=[1])
            graphs.capture()
            graphs.run(s.meta)
            row = {"arch": arch, "pdl": pdl_on, **timings(graphs.graphs[1].replay)}
            out["rows"].append(row)
            print(f"{arch:10} pdl={int(pdl_on)}: isolated {row['isolated_us']:7.1f} us, launch hidden "
                  f"{row['launch_hidden_us']:7.1f}, back to back {row['back_to_back_us']:7.1f}, host replay call "
                  f"{row['host_replay_call_us']:6.1f}", flush=True)
            del graphs
        set_pdl(True)
        del model, s
        torch.cuda.empty_cache()
    # the launch alone: graphs of N empty kernels
    x = torch.zeros(1, device="cuda")
    for n in (1, 85, 260):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(n):
                x.add_(1)
        row = {"arch": f"{n} tiny kernels", "pdl": False, **timings(g.replay)}
        out["rows"].append(row)
        print(f"{n:4} tiny kernels: isolated {row['isolated_us']:7.1f} us, launch hidden "
              f"{row['launch_hidden_us']:7.1f}, back to back {row['back_to_back_us']:7.1f}, host replay call "
              f"{row['host_replay_call_us']:6.1f}", flush=True)
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    (out_dir / "graph_launch.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
