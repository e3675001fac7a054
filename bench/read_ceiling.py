"""How fast can this GPU read? The decode floor divides bytes by the copy bandwidth (read + write); a GEMV only
reads. This measures, in one run, the copy bandwidth, plain read kernels (16-byte loads, several programs an SM,
register double-buffering as the streamed GEMV does it, or Triton's software pipeline) and bulk tensor-copy (TMA)
read kernels over 1 GiB, and the streamed GEMV (kernels/fused_triton.py) against a TMA GEMV prototype on
Llama-3.2-3B's shapes, each shape's weight in enough copies that every launch reads it cold from HBM.

Usage (GPU machine): python bench/read_ceiling.py → $OUT/read_ceiling.json (or bench/results/).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

from gemv_chain import copy_bandwidth     # noqa: E402 - bench/ is the script's directory
from kernels import graph_us             # noqa: E402
from hybridserve.kernels import fused_triton as ft

GIB = 1 << 30


@triton.jit
def _read_regs_kernel(x_ptr, out_ptr, per_prog, BLOCK: tl.constexpr, EVICT: tl.constexpr):
    """Sum of a contiguous run; the next block's load goes out before this block's add (the streamed GEMV's
    pattern)."""
    pid = tl.program_id(0)
    base = x_ptr + pid.to(tl.int64) * per_prog
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float32)
    cur = tl.load(base + offs, eviction_policy="evict_first" if EVICT else "")
    for i in range(BLOCK, per_prog, BLOCK):
        nxt = tl.load(base + i + offs, eviction_policy="evict_first" if EVICT else "")
        acc += cur.to(tl.float32)
        cur = nxt
    acc += cur.to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc))


@triton.jit
def _read_pipe_kernel(x_ptr, out_ptr, per_prog, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """The same sum with Triton's software pipeline (asynchronous copies into shared memory, STAGES deep)."""
    pid = tl.program_id(0)
    base = x_ptr + pid.to(tl.int64) * per_prog
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float32)
    for i in tl.range(0, per_prog, BLOCK, num_stages=STAGES):
        acc += tl.load(base + i + offs).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc))


@triton.jit
def _read_tma_kernel(desc, out_ptr, rows_per_prog, R: tl.constexpr, C: tl.constexpr, STAGES: tl.constexpr):
    """The same sum through bulk tensor copies of R × C boxes, STAGES deep."""
    pid = tl.program_id(0)
    r0 = pid * rows_per_prog
    acc = tl.zeros((R, C), tl.float32)
    for r in tl.range(r0, r0 + rows_per_prog, R, num_stages=STAGES):
        acc += desc.load([r, 0]).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc))


@triton.jit
def _gemv_tma_kernel(x_ptr, w_desc, y_ptr, N, BN: tl.constexpr, BK: tl.constexpr, KT: tl.constexpr,
                     STAGES: tl.constexpr):
    """y = W x with W's tiles through bulk tensor copies, STAGES deep; a program's run of row blocks as one
    pipelined loop (the row's sum and store when its last K tile is in)."""
    pid = tl.program_id(0)
    nb = tl.cdiv(N, BN)
    b0 = pid * nb // tl.num_programs(0)
    T = ((pid + 1) * nb // tl.num_programs(0) - b0) * KT
    rk = tl.arange(0, BK)
    acc = tl.zeros((BN, BK), tl.float32)
    for t in tl.range(0, T, num_stages=STAGES):
        b = b0 + t // KT
        kt = t % KT
        w = w_desc.load([b * BN, kt * BK])
        x = tl.load(x_ptr + kt * BK + rk).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
        if kt == KT - 1:
            rows = b * BN + tl.arange(0, BN)
            tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=rows < N)
            acc = tl.zeros((BN, BK), tl.float32)


def sms() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count


def read_cases(buf: torch.Tensor, out: torch.Tensor):
    """(name, call) for each read kernel over the whole of `buf` (bf16, 1 GiB)."""
    n = buf.numel()
    cases = [("torch.sum", lambda: torch.sum(buf, dtype=torch.float32))]
    for per_sm in (1, 2, 4, 8):
        for block, warps in ((2048, 4), (4096, 8), (8192, 8), (16384, 16)):
            progs = per_sm * sms()
            per = n // progs // block * block
            for evict in (False, True):
                def f(progs=progs, per=per, block=block, warps=warps, evict=evict):
                    _read_regs_kernel[(progs,)](buf, out, per, BLOCK=block, EVICT=evict, num_warps=warps,
                                                num_stages=1)
                cases.append((f"regs per_sm={per_sm} block={block} warps={warps} evict={int(evict)}", f, progs * per))
    for per_sm in (1, 2, 4):
        for block, warps in ((2048, 4), (4096, 8)):
            for stages in (2, 3, 4):
                progs = per_sm * sms()
                per = n // progs // block * block

                def f(progs=progs, per=per, block=block, warps=warps, stages=stages):
                    _read_pipe_kernel[(progs,)](buf, out, per, BLOCK=block, STAGES=stages, num_warps=warps)
                cases.append((f"pipe per_sm={per_sm} block={block} warps={warps} stages={stages}", f, progs * per))
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return cases
    C = 256
    view = buf.view(-1, C)
    for R in (16, 32, 64):
        desc = TensorDescriptor.from_tensor(view, [R, C])
        for per_sm in (1, 2):
            for stages in (2, 3, 4, 6):
                if R * C * 2 * stages > 160 * 1024 // per_sm:
                    continue
                progs = per_sm * sms()
                rows = view.shape[0] // progs // R * R

                def f(desc=desc, progs=progs, rows=rows, R=R, stages=stages):
                    _read_tma_kernel[(progs,)](desc, out, rows, R=R, C=C, STAGES=stages, num_warps=4)
                cases.append((f"tma per_sm={per_sm} box={R}x{C} stages={stages}", f, progs * rows * C))
    return cases


def gemv_cases(N: int, K: int, copies: int):
    """(name, [calls]) for y = W x on `copies` distinct [N, K] weights, streamed GEMV vs TMA prototypes."""
    ws = [torch.randn(N, K, device="cuda").to(torch.bfloat16) * K ** -0.5 for _ in range(copies)]
    x = torch.randn(1, K, device="cuda").to(torch.bfloat16)
    ref = (ws[0].float() @ x[0].float())
    ys = [torch.empty(1, N, device="cuda", dtype=torch.bfloat16) for _ in ws]
    out = [("stream", [lambda w=w: ft.linear(x, w) for w in ws], lambda: ft.linear(x, ws[0])[0])]
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return out, ref
    for BN, BK in ((8, 256), (16, 256), (32, 128), (32, 256), (64, 128)):
        for per_sm in (1, 2):
            for stages in (3, 4, 6):
                if BN * BK * 2 * stages > 160 * 1024 // per_sm:
                    continue
                descs = [TensorDescriptor.from_tensor(w, [BN, BK]) for w in ws]
                progs = min(triton.cdiv(N, BN), per_sm * sms())
                for warps in (4, 8):
                    def call(i, BN=BN, BK=BK, stages=stages, descs=descs, progs=progs, warps=warps):
                        _gemv_tma_kernel[(progs,)](x, descs[i], ys[i], N, BN=BN, BK=BK, KT=triton.cdiv(K, BK),
                                                   STAGES=stages, num_warps=warps)
                        return ys[i][0]
                    out.append((f"tma BN={BN} BK={BK} per_sm={per_sm} stages={stages} warps={warps}",
                                [lambda i=i, c=call: c(i) for i in range(copies)], lambda c=call: c(0)))
    return out, ref


def main():
    torch.manual_seed(0)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    bw = copy_bandwidth()
    res["copy_bandwidth_Bps"] = bw
    print(f"copy {bw / 1e12:.3f} TB/s", flush=True)
    buf = torch.randn(GIB // 2, device="cuda").to(torch.bfloat16)
    out = torch.zeros(64 * sms(), device="cuda", dtype=torch.float32)
    res["read"] = []
    for case in read_cases(buf, out):
        name, f = case[0], case[1]
        nbytes = case[2] * 2 if len(case) > 2 else buf.numel() * 2
        try:
            us = graph_us([f] * 5)
        except Exception as e:       # a configuration this Triton cannot build
            res["read"].append({"case": name, "error": repr(e)[:300]})
            print(name, "error", repr(e)[:200], flush=True)
            continue
        row = {"case": name, "us": us, "TBps": nbytes / us / 1e6, "of_copy": nbytes / (us * 1e-6) / bw}
        res["read"].append(row)
        print(f"{name}: {us:.1f} us {row['TBps']:.3f} TB/s", flush=True)
    del buf
    shapes = {"qkv": (5120, 3072), "o": (3072, 3072), "gate": (8192, 3072), "down": (3072, 8192),
              "head": (128256, 3072)}
    res["gemv"] = []
    for name, (N, K) in shapes.items():
        copies = max(1, min(16, (256 << 20) // (N * K * 2)))
        cases, ref = gemv_cases(N, K, copies)
        for cname, calls, one in cases:
            try:
                err = ((one().float() - ref).abs().max() / ref.abs().max()).item()
                us = graph_us(calls * max(1, 16 // copies))
            except Exception as e:
                res["gemv"].append({"shape": name, "case": cname, "error": repr(e)[:300]})
                print(name, cname, "error", repr(e)[:200], flush=True)
                continue
            row = {"shape": name, "N": N, "K": K, "case": cname, "us": us, "TBps": N * K * 2 / us / 1e6,
                   "rel_err": err}
            res["gemv"].append(row)
            print(f"{name} {cname}: {us:.2f} us {row['TBps']:.3f} TB/s err {err:.1e}", flush=True)
    path = Path(os.environ.get("OUT", Path(__file__).parent / "results")) / "read_ceiling.json"
    path.write_text(json.dumps(res, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
