"""How much of a decode step is bringing its inputs in (engine/cuda_graphs.py `PackedInputs.send`).

A step's inputs (tokens, positions, slots, KV slots, sequence lengths, block tables: ~2–33 KB at batch 1 for
the full-size models' context) sit in a pinned host buffer; the graph reads a device buffer. One decode graph,
timed back to back, batch 1, context 128, the ways in turn:

- copy: the earlier path: one cudaMemcpyAsync of the buffer with the whole block-table rows (a second copy of
  their used columns past 128 KB), then the replay;
- reference: kernels/input_fetch.py (a copy of the head, a second of the table's used columns);
- kernel: kernels/input_fetch_triton.py, one kernel reading the pinned buffer (the engine's path now);
- replay: the replay alone, nothing brought in (the lower bound);
- copy_async / kernel_async: as the engine's async-scheduled steps, the token taken from the previous step's
  argmax on the device (an index_select after the copy, or inside the kernel).

Checks that every way gives the copy's logits (the async ones: the same input token on the device). Usage (GPU
machine): python bench/input_fetch.py [--archs llama:3b,nanohammer,spartacus] → $OUT/input_fetch.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch

from decode_latency import (PAGE, Setup, interleaved_ms, load_full, measure_sm_clock_hz, nvidia_smi_clocks,
                            time_steps)
from hybridserve.engine.cuda_graphs import DecodeGraphs
from hybridserve.kernels import input_fetch as reference
from hybridserve.kernels import input_fetch_triton as kernel


class _Copy:
    """The input path before kernels/input_fetch*.py, as one `fetch`."""

    @staticmethod
    def fetch(host, dev, end, table=None, gather=None):
        whole = end + (4 * table[1] * table[2] if table is not None else 0)
        if whole <= (128 << 10):
            dev[:whole].copy_(host[:whole], non_blocking=True)
        else:
            reference.fetch(host, dev, end, table)
        if gather is not None:
            dst, src, n, values = gather
            d64 = dev.view(torch.int64)
            torch.index_select(values, 0, d64[src:src + n], out=d64[dst:dst + n])


def rows_for(arch: str, rounds: int) -> dict:
    model = load_full(arch)
    s = Setup(model, 1, 128)
    width = -(-model.max_model_len // PAGE)
    g = DecodeGraphs(model, s.pools.view, 1, width, sizes=[1])
    g.capture()
    chained = [dataclasses.replace(c, prev_row=0) for c in s.chunks]
    prev = g.argmax[1]

    def way(ops, chunks=s.chunks, prev_tokens=None):
        def step():
            g.inputs._ops = ops
            return g.run_chunks(chunks, PAGE, prev_tokens)
        return step

    steps = {"copy": way(_Copy), "reference": way(reference), "kernel": way(kernel),
             "copy_async": way(_Copy, chained, prev), "kernel_async": way(kernel, chained, prev)}
    # the same logits from the same state (a step writes the slot state: restored before each way)
    saved = [t.clone() for t in s.pools.view.states.values()]
    ref_out, same = None, {}
    for name in ("copy", "reference", "kernel"):
        for t, v in zip(s.pools.view.states.values(), saved):
            t.copy_(v)
        out = steps[name]().float().clone()
        ref_out = out if ref_out is None else ref_out
        same[name] = bool(torch.equal(out, ref_out))
    for name in ("copy_async", "kernel_async"):
        token = prev[0].item()
        steps[name]()
        torch.cuda.synchronize()
        same[name] = g.input_ids[0].item() == token
    steps["replay"] = g.graphs[1].replay
    runs = interleaved_ms(steps, rounds, time_steps)
    g.inputs._ops = kernel
    med = {name: sorted(r)[len(r) // 2] for name, r in runs.items()}
    return {"arch": arch, "ms_per_step": med, "rounds": runs, "same_logits_as_copy": same,
            "input_bytes": g.inputs.device_bytes.numel(), "block_table_columns": width}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="llama:3b,nanohammer,spartacus")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "sm_clock_hz": measure_sm_clock_hz(), "nvidia_smi": nvidia_smi_clocks(), "rows": []}
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    for arch in args.archs.split(","):
        row = rows_for(arch, args.rounds)
        out["rows"].append(row)
        print(f"{arch:12} " + "  ".join(f"{k} {v:.4f}" for k, v in row["ms_per_step"].items())
              + f"  same {row['same_logits_as_copy']}", flush=True)
        torch.cuda.empty_cache()
        (out_dir / "input_fetch.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
