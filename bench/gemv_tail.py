"""Where a streamed GEMV's ~2 µs over its bytes goes at batch 1 (bench/read_ceiling.py: Llama-3.2-3B's o
3072×3072 takes 8.0 µs in a chain of its own kind against 6.1 at the 3.1 TB/s read ceiling; the 128k-row head
reaches 3.06 TB/s). A suspect: the programs' runs are whole 4-row blocks, so with o's 768 blocks over 528
programs 240 programs have two blocks and 288 one, and the second half of the kernel runs on 240 programs, too few
loads in flight to hold the bus. This sweeps an experimental copy of the streamed GEMV (plain y = W x, PDL as the
real one) over: runs split by row instead of by block (ROWSPLIT), one or two tiles in flight a program (DEPTH),
rows and K tile per tile, warps and programs per SM; first each shape in a chain of its own kind, then a whole
Llama-3.2-3B layer's four GEMVs in a chain with each shape's best setting, against kernels/fused_triton.py's GEMV.

Usage (GPU machine): python bench/gemv_tail.py → $OUT/gemv_tail.json (or bench/results/).
"""
from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

from kernels import graph_us      # noqa: E402 - bench/kernels.py (bench/ is the script's directory)
from hybridserve.kernels import fused_triton as ft
from hybridserve.kernels import pdl

SHAPES = {"qkv": (5120, 3072), "o": (3072, 3072), "gate_up": (16384, 3072), "down": (3072, 8192)}


@triton.jit
def _tile(w_ptr, N, K, r0, r1, t, T, BN: tl.constexpr, BK: tl.constexpr, KT: tl.constexpr):
    return ft._stream_tile(w_ptr, N, K, r0, r1, t, T, BN, BK, KT, False, EW="")[0]


@triton.jit
def _product(acc, w, x_ptr, K, t, y_ptr, r0, r1, BN: tl.constexpr, BK: tl.constexpr, KT: tl.constexpr):
    rk = tl.arange(0, BK)
    kk = (t % KT) * BK + rk
    x = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
    acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    if t % KT == KT - 1:
        r = r0 + (t // KT) * BN + tl.arange(0, BN)
        tl.store(y_ptr + r, acc.to(y_ptr.dtype.element_ty), mask=r < r1)
        acc = tl.zeros((BN,), dtype=tl.float32)
    return acc


@triton.jit
def _gemv_x_kernel(x_ptr, w_ptr, y_ptr, N, K, BN: tl.constexpr, BK: tl.constexpr, KT: tl.constexpr,
                   ROWSPLIT: tl.constexpr, DEPTH: tl.constexpr, PDL: tl.constexpr):
    r0, r1, T = ft._stream_span(N, tl.program_id(0), tl.num_programs(0), BN, KT, ROWSPLIT)
    acc = tl.zeros((BN,), dtype=tl.float32)
    w0 = _tile(w_ptr, N, K, r0, r1, 0, T, BN, BK, KT)
    if DEPTH == 2:
        w1 = _tile(w_ptr, N, K, r0, r1, 1, T, BN, BK, KT)
    if PDL:
        pdl.enter(PDL)
    for t in range(0, T):
        if DEPTH == 2:
            w2 = _tile(w_ptr, N, K, r0, r1, t + 2, T, BN, BK, KT)
        else:
            w2 = _tile(w_ptr, N, K, r0, r1, t + 1, T, BN, BK, KT)
        acc = _product(acc, w0, x_ptr, K, t, y_ptr, r0, r1, BN, BK, KT)
        if DEPTH == 2:
            w0 = w1
            w1 = w2
        else:
            w0 = w2


def gemv_x(x, w, y, BN, BK, warps, per_sm, rowsplit, depth, maxnreg=64):
    N, K = w.shape
    _gemv_x_kernel[(ft._stream_grid(N, BN, per_sm, rowsplit, x.device),)](
        x, w, y, N, K, BN=BN, BK=BK, KT=triton.cdiv(K, BK), ROWSPLIT=rowsplit, DEPTH=depth, num_warps=warps,
        num_stages=1, **pdl.launch_kwargs(x.device), **pdl.register_cap(maxnreg, x.device))
    return y


def settings():
    for BN, BK, warps, per_sm, rowsplit, depth in itertools.product(
            (1, 2, 4, 8), (512, 1024, 2048), (4, 8), (4, 8), (0, 1), (1, 2)):
        if BN * BK < warps * 32 * 8 or BN * BK * depth > 16384:
            continue
        yield dict(BN=BN, BK=BK, warps=warps, per_sm=per_sm, rowsplit=rowsplit, depth=depth)


def main():
    torch.manual_seed(0)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "shapes": {}, "layer": []}
    copies = 8
    ws = {n: [(torch.randn(N, K, device="cuda") * K ** -0.5).to(torch.bfloat16) for _ in range(copies)]
          for n, (N, K) in SHAPES.items()}
    xs = {n: torch.randn(1, K, device="cuda").to(torch.bfloat16) for n, (N, K) in SHAPES.items()}
    ys = {n: [torch.empty(1, N, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
          for n, (N, K) in SHAPES.items()}
    best = {}
    for name, (N, K) in SHAPES.items():
        x, w, y = xs[name], ws[name], ys[name]
        ref = ft.linear(x, w[0]).float()
        base = graph_us([lambda i=i: ft.linear(x, w[i]) for i in range(copies)] * 2)
        rows = [{"setting": "fused_triton", "us": base}]
        print(f"{name} fused_triton {base:.2f} us ({N * K * 2 / base / 1e6:.3f} TB/s)", flush=True)
        for s in settings():
            try:
                got = gemv_x(x, w[0], y[0], **s).float()
                err = ((got - ref).abs().max() / ref.abs().max()).item()
                us = graph_us([lambda i=i: gemv_x(x, w[i], y[i], **s) for i in range(copies)] * 2)
            except Exception as e:      # noqa: BLE001 - a setting this Triton cannot build
                rows.append({"setting": s, "error": repr(e)[:200]})
                continue
            rows.append({"setting": s, "us": us, "rel_err": err})
        ok = sorted((r for r in rows[1:] if "us" in r and r["rel_err"] < 2e-2), key=lambda r: r["us"])
        for r in ok[:8]:
            print(f"  {r['setting']} {r['us']:.2f} us err {r['rel_err']:.1e}", flush=True)
        best[name] = ok[0]["setting"]
        res["shapes"][name] = {"N": N, "K": K, "bytes": N * K * 2, "rows": rows}

    # a layer's four GEMVs in turn (o's input is a slice of q|k|v's output, down's of gate|up's), 8 layers
    def layer_calls(fn):
        calls = []
        for i in range(copies):
            for name in SHAPES:
                calls.append(lambda i=i, name=name: fn(name, i))
        return calls

    def chain_input(name):
        prev = {"qkv": "down", "o": "qkv", "gate_up": "o", "down": "gate_up"}[name]
        return lambda i: ys[prev][(i - (name == "qkv")) % copies][:, :SHAPES[name][1]]

    inputs = {n: chain_input(n) for n in SHAPES}
    layer_bytes = sum(N * K * 2 for N, K in SHAPES.values())

    def best_fn(name, i):
        gemv_x(inputs[name](i), ws[name][i], ys[name][i], **best[name])

    def rowsplit_fn(name, i):      # the fused_triton setting, runs split by row
        gemv_x(inputs[name](i), ws[name][i], ys[name][i], BN=4, BK=2048, warps=8, per_sm=4, rowsplit=1, depth=1)

    def base_nocopy(name, i):
        ft.linear(inputs[name](i), ws[name][i])

    for rnd in range(3):
        for label, fn in (("fused_triton", base_nocopy), ("rowsplit", rowsplit_fn), ("best", best_fn)):
            us = graph_us(layer_calls(fn)) * len(SHAPES)
            res["layer"].append({"round": rnd, "variant": label, "us_per_layer": us,
                                 "TBps": layer_bytes / us / 1e6})
            print(f"layer {label}: {us:.2f} us ({layer_bytes / us / 1e6:.3f} TB/s)", flush=True)
    res["best"] = best
    path = Path(os.environ.get("OUT", Path(__file__).parent / "results")) / "gemv_tail.json"
    path.write_text(json.dumps(res, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
