"""The persistent Spartacus decode-step kernel (kernels/spartacus_step_triton.py) against the per-layer
kernels it replaces, at batch 1 on the full-size synthetic Spartacus (16 layers, 2048 hidden, 128k vocabulary).

In one run: the floor (weights + the state read and written, over the measured copy bandwidth); one step
through both paths on copies of one state (logits, argmax, state: the check that the barriers hold); the
decode graph as the engine captures it (bench/decode_latency.py graph_ms), per-layer kernels and step
kernel alternating A/B/A/B; the step kernel alone per register cap and programs per SM; and the cost of a bare grid
barrier (a kernel that only meets at barriers), so the step's time splits into streaming and syncing.

Usage (GPU machine, from bench/): python step_kernel.py → $OUT/step_kernel.json (or bench/results/).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import triton

import decode_latency as dl
from hybridserve.kernels import fused_triton as ft
from hybridserve.kernels import spartacus_step_triton as step_tr
from hybridserve.models import spartacus


@triton.jit
def _barriers_kernel(bar_ptr, n, spin_limit):
    ok = 1
    for i in range(n):
        ok = step_tr._grid_sync(bar_ptr, i, ok, spin_limit)
    step_tr._grid_exit(bar_ptr, ok)


def barrier_us(programs: int, n: int = 200) -> dict:
    """µs per grid barrier of `programs` programs (8 warps each), from kernels of n and 0 barriers."""
    bar = torch.zeros(4, dtype=torch.int32, device="cuda")

    def run(k):
        return lambda: _barriers_kernel[(programs,)](bar, k, step_tr.SPIN_LIMIT, num_warps=step_tr.WARPS)
    t_n = dl.time_fn(run(n), iters=50, warmup=5)
    t_0 = dl.time_fn(run(0), iters=50, warmup=5)
    return {"programs": programs, "barriers": n, "us_per_barrier": 1e3 * (t_n - t_0) / n,
            "errors": int(bar[2].item())}


def check(model, s) -> dict:
    """One step through the step kernel and through the per-layer kernels, on copies of the state."""
    pools = s.pools.view.states["monoid"]
    before = pools.clone()
    got = model.forward(s.meta, s.pools.view).clone()
    got_states = pools.clone()
    pools.copy_(before)
    spartacus.STEP_KERNEL = False
    try:
        want = model.forward(s.meta, s.pools.view).clone()
    finally:
        spartacus.STEP_KERNEL = True
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()   # noqa: E731
    slot = int(s.meta.slot_ids[0])
    out = {"logits_rel_err": rel(got, want), "argmax_equal": bool(got.argmax() == want.argmax()),
           "state_rel_err": rel(got_states[:, slot], pools[:, slot]),
           "other_slots_untouched": bool(torch.equal(got_states[:, :slot], before[:, :slot])
                                         and torch.equal(got_states[:, slot + 1:], before[:, slot + 1:])),
           "barrier_errors": step_tr.errors(model.step_weights),
           "counters_reset": not any(step_tr.counters(model.step_weights))}
    pools.copy_(before)
    return out


def main():
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    bw = dl.measure_copy_bandwidth()
    model = dl.load_full("spartacus")
    s = dl.Setup(model, 1, 128)
    floor_ms = 1e3 * (model.weights_bytes() + 2 * s.state_bytes) / bw
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "copy_bandwidth_Bps": bw, "weights_bytes": model.weights_bytes(), "floor_ms": floor_ms}
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s, floor {floor_ms:.3f} ms", flush=True)
    spartacus.STEP_KERNEL = True
    with torch.inference_mode():
        result["check"] = check(model, s)
    print("check", result["check"], flush=True)
    save = lambda: (out_dir / "step_kernel.json").write_text(json.dumps(result, indent=1))   # noqa: E731
    save()
    ab = {}
    for label, on in (("per_layer", False), ("step", True), ("per_layer_again", False), ("step_again", True)):
        spartacus.STEP_KERNEL = on
        ab[label] = dl.graph_ms(model, s, 1)
        print(f"decode graph {label:16} {ab[label]:.3f} ms  x{ab[label] / floor_ms:.3f} floor", flush=True)
    result["decode_graph_ms"] = ab
    result["ratio_to_floor"] = {k: v / floor_ms for k, v in ab.items()}
    save()
    # the per-layer path with the streamed GEMV capped at 64 registers (all 4 programs of an SM resident)
    cap = ft.GEMV_STREAM_MAXNREG
    spartacus.STEP_KERNEL, ft.GEMV_STREAM_MAXNREG = False, 64
    try:
        result["decode_graph_ms"]["per_layer_stream_maxnreg64"] = dl.graph_ms(model, s, 1)
    finally:
        spartacus.STEP_KERNEL, ft.GEMV_STREAM_MAXNREG = False, cap
    print(f"decode graph per-layer, stream capped at 64 registers: "
          f"{result['decode_graph_ms']['per_layer_stream_maxnreg64']:.3f} ms", flush=True)
    sw, ids, slots, pools = model.step_weights, s.meta.input_ids, s.meta.slot_ids, s.pools.view.states["monoid"]
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    start = pools.clone()
    want = step_tr.decode_step(sw, ids, slots, pools).clone()
    sweep, defaults = [], (step_tr.PROGRAMS_PER_SM, step_tr.MAXNREG)
    for mr in (None, 96, 80, 64):
        for n in (2, 3, 4):
            ws = step_tr._workspace(sw)
            step_tr.PROGRAMS_PER_SM, step_tr.MAXNREG, ws.grid = n, mr, None
            try:
                pools.copy_(start)
                same = bool(torch.equal(step_tr.decode_step(sw, ids, slots, pools), want))
                if any(r["maxnreg"] == mr and r["grid"] == ws.grid for r in sweep):
                    continue                     # capped at what fits: already timed
                ms = dl.time_fn(lambda: step_tr.decode_step(sw, ids, slots, pools), iters=100, warmup=20)
            finally:
                step_tr.PROGRAMS_PER_SM, step_tr.MAXNREG = defaults
            sweep.append({"maxnreg": mr, "programs_per_sm": ws.grid / sm, "grid": ws.grid, "ms": ms,
                          "ratio_to_floor": ms / floor_ms, "same_logits": same, "errors": step_tr.errors(sw)})
            print(f"step kernel alone, maxnreg {mr}, {ws.grid / sm:.0f} per SM: {ms:.3f} ms "
                  f"x{ms / floor_ms:.3f}  same logits {same}", flush=True)
    step_tr._workspace(sw).grid = None
    pools.copy_(start)
    result["step_kernel_alone"] = sweep
    save()
    result["barrier"] = [barrier_us(p * sm) for p in (1, 2, 3, 4)]
    for b in result["barrier"]:
        print(f"barrier, {b['programs']} programs: {b['us_per_barrier']:.2f} us", flush=True)
    (out_dir / "step_kernel.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
