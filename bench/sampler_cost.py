"""GPU time of the sampler's parts (engine/sampler.py) per batch size and vocabulary, from torch.profiler:
which op a sampled decode step spends its sampling time on (temperature, min_p / top_k / top_p truncation,
softmax, the draw) in the eager sampler, and in the form the sampler graphs take (`truncation_floor` and the
split-row race / argmax of kernels/sampling_triton.py), against the time of reading the logits once.

Usage (GPU machine): python bench/sampler_cost.py → $OUT/sampler_cost.json (or bench/results/).
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from hybridserve.engine.request import SamplingParams
from hybridserve.engine.sampler import Sampler, truncation_floor
from hybridserve.kernels import sampling_triton

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


def main():
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    sampler = Sampler()
    for V in (49152, 128256):
        for B in (1, 32):
            logits = torch.randn(B, V, device="cuda") * 4
            for case, kw in CASES.items():
                params = [SamplingParams(**kw)] * B
                total, ops = profile_ops(lambda: sampler(logits, params, [[]] * B, [[]] * B, [None] * B))
                row = {"vocab": V, "batch": B, "case": case, "gpu_us": total, "read_once_us": B * V * 4 / 3.0e6,
                       "top": ops}
                out["rows"].append(row)
                print(f"V={V:6} B={B:3} {case:11} {total:8.1f} us  " + ", ".join(
                    f"{o['kernel'][:28]} {o['us']:.0f}" for o in ops[:4]), flush=True)
            # the sampler graphs' form of the same draws (engine/sampler_graphs.py), eager here
            seed = torch.zeros(1, dtype=torch.long, device="cuda")
            inv_t, ones = torch.full((B,), 1 / 0.8, device="cuda"), torch.ones(B, device="cuda")
            knobs = (torch.zeros(B, device="cuda"), torch.full((B,), V, device="cuda"),
                     torch.full((B,), 0.95, device="cuda"))
            for case, fn in (("graph_form_temperature", lambda: sampling_triton.race(logits, inv_t, seed)),
                             ("graph_form_top_p", lambda: sampling_triton.race(logits * 1.25, ones, seed,
                                                                    truncation_floor(logits * 1.25, *knobs))),
                             ("graph_form_greedy", lambda: sampling_triton.argmax(logits))):
                total, ops = profile_ops(fn)
                out["rows"].append({"vocab": V, "batch": B, "case": case, "gpu_us": total, "top": ops})
                print(f"V={V:6} B={B:3} {case:11} {total:8.1f} us  " + ", ".join(
                    f"{o['kernel'][:28]} {o['us']:.0f}" for o in ops[:4]), flush=True)
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    (out_dir / "sampler_cost.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
