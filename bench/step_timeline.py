"""Where a decode step's time goes (batch 1 unless --batch), kernel by kernel, as the GPU ran it: the step's CUDA graph
(bench/decode_latency.py's, as the engine replays it) profiled over a few replays with torch.profiler. Each
kernel's *exposed* time is how far it moved the end of the step: its end minus the latest end before it
(kernels overlap under programmatic dependent launch, so busy time adds up to more than the step). Summed by
kernel name, exposed time is the step; a kernel that hides under its predecessor shows ~0.

The profiler moves the start of a graph: under it, the kernels after a graph's first start late, by 3-4 µs in a
one-stream graph and 12-17 µs where the graph forks a second stream (NanoHammer's state entries), which timed
replays do not pay (bench/graph_joins.py, bench/results/graph_joins-h100.json: a branch of one kernel joined at
once costs the timed replay 1.2-1.5 µs while the profile shows the main chain's next kernel 16-17 µs later). Read
a step's first kernels with that in mind; further in, the profile's kernel-to-kernel spacing matches the timed rate.

Usage (GPU machine): python bench/step_timeline.py [--archs spartacus,...] [--variants default,resident_o,...]
(the variants are bench/decode_latency.py's A/B knobs)
→ $OUT/step_timeline.json (or bench/results/).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from decode_latency import (PAGE, Setup, load_full, measure_copy_bandwidth, measure_sm_clock_hz, nvidia_smi_clocks,
                            step_weight_bytes, time_fn, variant_knob)
from hybridserve.engine.cuda_graphs import DecodeGraphs

REPLAYS = 5


def short(name: str) -> str:
    for cut in ("<", "("):
        name = name.split(cut)[0]
    return name[:60]


def timeline(model, batch: int = 1, back_to_back: bool = False) -> dict:
    s = Setup(model, batch, 128)
    width = max(s.pages_per_seq, -(-model.max_model_len // PAGE))
    graphs = DecodeGraphs(model, s.pools.view, batch, width, sizes=[batch])
    graphs.capture()
    # each replay from an idle GPU with the earlier sessions' input path, or (back to back) queued behind the one
    # before with its inputs in one copy from the pinned mirrors, as decode_latency.py times it and the engine runs
    run = (lambda: graphs.run_chunks(s.chunks, PAGE)) if back_to_back else (lambda: graphs.run(s.meta))
    ms = time_fn(run)
    for _ in range(20):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPLAYS):
            run()
            if not back_to_back:
                torch.cuda.synchronize()
        torch.cuda.synchronize()
    kernels = sorted(((e.time_range.start, e.time_range.end, short(e.name)) for e in prof.events()
                      if e.device_type == torch.autograd.DeviceType.CUDA
                      and (back_to_back or ("Memcpy" not in e.name and "Memset" not in e.name))), key=lambda k: k[0])
    per = len(kernels) // REPLAYS                   # every replay runs the same kernels
    steps = [kernels[i * per:(i + 1) * per] for i in range(REPLAYS)]
    exposed, busy, count = defaultdict(float), defaultdict(float), defaultdict(int)
    spans = []
    for st in steps:
        end = st[0][0]
        for a, b, name in st:
            exposed[name] += max(0.0, b - max(end, a)) + max(0.0, a - end)   # its own time + the gap before it
            busy[name] += b - a
            count[name] += 1
            end = max(end, b)
        spans.append(end - st[0][0])
    n = len(steps)
    rows = sorted(({"kernel": k, "calls": count[k] / n, "exposed_us": exposed[k] / n, "busy_us": busy[k] / n}
                   for k in exposed), key=lambda r: -r["exposed_us"])
    first = steps[-1]
    seq = [{"kernel": name, "start_us": a - first[0][0], "dur_us": b - a} for a, b, name in first]
    # from the end of one replay's last kernel to the start of the next one's first
    gaps = [b[0][0] - max(e for _, e, _ in a) for a, b in zip(steps, steps[1:])]
    return {"batch": batch, "back_to_back": back_to_back, "ms_per_step_timed": ms, "profiled_steps": n,
            "gaps_between_steps_us": gaps,
            "profiled_span_us": sorted(spans)[n // 2], "kernels_per_step": len(first), "by_kernel": rows,
            "one_step": seq}


def one(arch: str, variant: str, bw: float, batch: int, back_to_back: bool) -> dict:
    model = load_full(arch)
    if variant != "default":
        _, put, value = variant_knob(variant)
        put(value)
    return {"arch": arch, "variant": variant, "weights_bytes": model.weights_bytes(),
            "step_weight_bytes": step_weight_bytes(model), "floor_ms": 1e3 * step_weight_bytes(model) / bw,
            **timeline(model, batch, back_to_back)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="spartacus,nanohammer,kotodama:3b,kotodama,neollm")
    ap.add_argument("--variants", default="default", help="comma list: default and decode_latency.py's knobs")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--back-to-back", action="store_true",
                    help="queue the profiled replays without a sync between them, inputs as decode_latency.py "
                         "sends them; copies included (the last replay is shown)")
    ap.add_argument("--child", default="", help="(internal) arch,variant,bandwidth: one row as JSON on stdout")
    args = ap.parse_args()
    if args.child:      # one model and setting per process: a finished profiler slows what runs after it
        arch, variant, bw = args.child.split(",")
        print("ROW " + json.dumps(one(arch, variant, float(bw), args.batch, args.back_to_back)))
        return
    bw = measure_copy_bandwidth()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bandwidth_Bps": bw,
           "sm_clock_hz": measure_sm_clock_hz(), "nvidia_smi": nvidia_smi_clocks(), "rows": []}
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    for arch in args.archs.split(","):
        for variant in args.variants.split(","):
            res = subprocess.run([sys.executable, __file__, "--child", f"{arch},{variant},{bw}",
                                  "--batch", str(args.batch)] + ["--back-to-back"] * args.back_to_back,
                                 capture_output=True, text=True)
            line = next((x for x in res.stdout.splitlines() if x.startswith("ROW ")), None)
            if line is None:
                print(f"{arch} {variant} failed:\n{res.stderr[-2000:]}", flush=True)
                continue
            row = json.loads(line[4:])
            out["rows"].append(row)
            print(f"{arch:12} {variant} step {row['ms_per_step_timed']:.3f} ms (profiled span "
                  f"{row['profiled_span_us']:.0f} us, {row['kernels_per_step']} kernels, weights floor "
                  f"{row['floor_ms']:.3f} ms)", flush=True)
            for r in row["by_kernel"][:8]:
                print(f"    {r['kernel'][:44]:44} x{r['calls']:5.1f}  exposed {r['exposed_us']:7.1f} us  busy "
                      f"{r['busy_us']:7.1f} us", flush=True)
            (out_dir / "step_timeline.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
