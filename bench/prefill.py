"""Monoid (Spartacus) varlen prefill on the GPU: the chunk-parallel Triton kernels against the PyTorch
reference and against the previous sequential-chunk kernel (kept here only to compare), then tile sweeps
of the two passes, then whole-model TTFT of the full-size synthetic Spartacus with each kernel.

    PYTHONUNBUFFERED=1 python3 bench/prefill.py [--no-sweep] [--no-ttft] [--quick]

Shapes: H 32, d 64 (Spartacus-1.3B), bf16 q/k/v, fp32 log α and state. Errors are ‖out − ref‖/‖ref‖
against the fp32 reference (`kernels/monoid.py`, fp32 inputs upcast from the same bf16 values); the bf16
reference's own rounding error is printed beside them. Times: triton.testing.do_bench medians, L2 flushed.
TTFT: the `prefill` part of bench/decode_latency.py (same functions, same model), run once per kernel.
Writes $OUT/prefill.json, or bench/results/prefill.json when OUT is unset.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench

from hybridserve.kernels import monoid as ref
from hybridserve.kernels import monoid_triton as tr

ROOT = Path(__file__).resolve().parents[1]

DEV = "cuda"
H, D = 32, 64
FAILURES: list[str] = []


# ------------------------------------------------------------ the previous kernel, for comparison only

@triton.jit
def _old_prefill_kernel(q_ptr, k_ptr, v_ptr, la_ptr, s_ptr, slot_ptr, cu_ptr, o_ptr,
                    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sa_t, sa_h, so_t, so_h,
                    H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr):
    """Chunked scan: per chunk of BT tokens, inter-chunk term through the carried state (one matmul),
    intra-chunk term as a masked BT×BT decay-weighted score matrix, then one matmul to advance the state.
    Chunks of one sequence run in order inside the program, so parallelism is N·H·(dv/BV) programs.

    Decay ratios are always formed as exp(b_t − b_s) with t ≥ s (exponent ≤ 0), so no factor can
    overflow however fast a gate decays.
    """
    n = tl.program_id(0)
    h = tl.program_id(1)
    rk = tl.arange(0, BK)
    rv = tl.program_id(2) * BV + tl.arange(0, BV)
    rt = tl.arange(0, BT)
    mk = rk < DK
    mv = rv < DV
    slot = tl.load(slot_ptr + n).to(tl.int64)
    bos = tl.load(cu_ptr + n)
    eos = tl.load(cu_ptr + n + 1)

    s_off = ((slot * H + h) * DK + rk[:, None]) * DV + rv[None, :]
    ms = mk[:, None] & mv[None, :]
    S = tl.load(s_ptr + s_off, mask=ms, other=0.)
    causal = rt[:, None] >= rt[None, :]

    for t0 in range(bos, eos, BT):
        tok = (t0 + rt).to(tl.int64)
        mt = tok < eos
        mtk = mt[:, None] & mk[None, :]
        mtv = mt[:, None] & mv[None, :]
        q = tl.load(q_ptr + tok[:, None] * sq_t + h * sq_h + rk[None, :], mask=mtk, other=0.).to(tl.float32)
        k = tl.load(k_ptr + tok[:, None] * sk_t + h * sk_h + rk[None, :], mask=mtk, other=0.).to(tl.float32)
        la = tl.load(la_ptr + tok[:, None] * sa_t + h * sa_h + rk[None, :], mask=mtk, other=0.).to(tl.float32)
        v = tl.load(v_ptr + tok[:, None] * sv_t + h * sv_h + rv[None, :], mask=mtv, other=0.).to(tl.float32)
        b = tl.cumsum(la, axis=0)  # inclusive log-decay from the chunk start; padded rows add 0

        o = tl.dot(q * tl.exp(b), S, input_precision="ieee")
        # Intra-chunk scores with the exact pairwise decay, as one [BT, BT, BK] broadcast: no row
        # extraction or per-column loop, which cost ~2.5x more on H100 (bench/results/kernels-h100.json).
        w = tl.exp(tl.minimum(b[:, None, :] - b[None, :, :], 0.))
        A = tl.sum(q[:, None, :] * k[None, :, :] * w, axis=2)
        A = tl.where(causal, A, 0.)
        o += tl.dot(A, v, input_precision="ieee")
        tl.store(o_ptr + tok[:, None] * so_t + h * so_h + rv[None, :], o.to(o_ptr.dtype.element_ty), mask=mtv)

        b_last = tl.sum(tl.where((rt == BT - 1)[:, None], b, 0.), axis=0)
        kd = k * tl.exp(b_last[None, :] - b)
        S = S * tl.exp(b_last)[:, None] + tl.dot(tl.trans(kd), v, input_precision="ieee")

    tl.store(s_ptr + s_off, S, mask=ms)


def old_prefill(q, k, v, log_a, cu, pool, ids):
    """The previous varlen_prefill: 16-token chunks walked in order per (sequence, head, value block)."""
    T = q.shape[0]
    o = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    BV, warps = (32, 4) if ids.shape[0] * H * D // 32 >= 2 * sms else (16, 8)
    _old_prefill_kernel[(ids.shape[0], H, D // BV)](
        q, k, v, log_a, pool, ids, cu, o, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), log_a.stride(0), log_a.stride(1), o.stride(0), o.stride(1),
        H=H, DK=D, DV=D, BK=D, BV=BV, BT=16, num_warps=warps)
    return o


# ------------------------------------------------------------------------------------------- helpers

def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def us(fn, rep_ms: int = 50) -> float:
    return do_bench(fn, warmup=10, rep=rep_ms, return_mode="median") * 1e3


def inputs(lens, dtype=torch.bfloat16, strong=False):
    T, N = sum(lens), len(lens)
    q = (torch.randn(T, H, D, device=DEV) * D ** -0.5).to(dtype)
    k = F.silu(torch.randn(T, H, D, device=DEV)).to(dtype)
    v = torch.randn(T, H, D, device=DEV).to(dtype)
    log_a = F.logsigmoid(torch.randn(T, H, D, device=DEV) * (4 if strong else 1) + (0 if strong else 3))
    if strong:
        log_a[::7, :, ::3] = -30.
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    ids = torch.randperm(N, device=DEV) + 1
    pool = torch.randn(N + 2, H, D, D, device=DEV) * 0.1     # slot N + 1 is never addressed
    return (q, k, v, log_a), cu, ids, pool


def name(lens) -> str:
    return str(lens) if len(lens) <= 10 else f"{len(lens)}x{lens[0]}"


# ------------------------------------------------------------------------------------------- checks

CHECKS = [([512], torch.bfloat16, False), ([4096], torch.bfloat16, False), ([512] * 8, torch.bfloat16, False),
          ([1, 2, 63, 64, 65, 100, 1000, 333, 17, 0], torch.bfloat16, False),
          ([4096], torch.bfloat16, True), ([1, 2, 63, 64, 65, 1000, 0], torch.float32, True),
          ([64] * 64, torch.bfloat16, False)]


def check(rows):
    print("\n[correctness] rel err vs fp32 reference (bf16 ref's own rounding error in brackets)", flush=True)
    for lens, dtype, strong in CHECKS:
        (q, k, v, la), cu, ids, pool = inputs(lens, dtype, strong)
        if lens[-1] == 0:
            ids[-1] = 0                                           # the empty sequence is a pad row
        p32, pref, pnew, pold = pool.clone(), pool.clone(), pool.clone(), pool.clone()
        o32 = ref.varlen_prefill(q.float(), k.float(), v.float(), la, cu, p32, ids)
        oref = ref.varlen_prefill(q, k, v, la, cu, pref, ids)
        onew = tr.varlen_prefill(q, k, v, la, cu, pnew, ids)
        oold = old_prefill(q, k, v, la, cu, pold, ids)
        torch.cuda.synchronize()
        live = ids[ids != 0]
        row = dict(lens=name(lens), dtype=str(dtype).split(".")[-1], strong_decay=strong,
                   err_new=rel(onew, o32), err_old=rel(oold, o32), err_ref=rel(oref, o32),
                   err_new_vs_rounded_ref=rel(onew, oref),
                   state_err_new=rel(pnew[live], p32[live]), state_err_old=rel(pold[live], p32[live]),
                   untouched=bool(torch.equal(pnew[-1], pool[-1])), finite=bool(torch.isfinite(onew).all()))
        limit = 2.5e-3 if dtype == torch.bfloat16 else 1e-4
        row["ok"] = (row["err_new"] < limit and row["state_err_new"] < 1e-4 and row["untouched"] and row["finite"])
        if not row["ok"]:
            FAILURES.append(f"check {row}")
        rows.append(row)
        print(f"  {row['lens']:<40} {row['dtype']:<8} strong={strong!s:<5} new {row['err_new']:.2e} "
              f"old {row['err_old']:.2e} [ref {row['err_ref']:.2e}]  state new {row['state_err_new']:.1e} "
              f"old {row['state_err_old']:.1e}{'' if row['ok'] else '  FAIL'}", flush=True)


# ------------------------------------------------------------------------------------------- sweeps

# per chunk size: pass 1 (local_bk, local_bv, warps), pass 2 (scan_rows, warps, stages),
# pass 3 (out_bv, warps, stages)
LOCAL_TILES = {64: [(64, 64, 4), (64, 64, 8), (32, 64, 4), (64, 32, 4)], 128: [(64, 64, 8), (32, 64, 4)]}
SCAN_TILES = {64: [(16, 4, 3), (8, 2, 3), (8, 1, 4), (4, 1, 4), (32, 4, 3), (64, 4, 2)], 128: [(16, 4, 3), (8, 2, 3)]}
OUT_TILES = {64: [(64, 4, 2), (64, 4, 3), (64, 8, 2), (64, 2, 2), (64, 4, 1), (32, 4, 2)], 128: [(64, 4, 2), (64, 8, 2)]}


def timed(fn) -> float:
    """A config that fails to compile or run is recorded as infinitely slow, not fatal."""
    try:
        return us(fn)
    except Exception as e:   # noqa: BLE001 - e.g. out of shared memory for one tile shape
        print(f"    config failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return float("inf")


def sweep(shapes, rows):
    """Each pass alone, per chunk size; the best of each pass (same chunk) per shape is the recommendation."""
    best = {}
    for lens in shapes:
        (q, k, v, la), cu, ids, pool = inputs(lens)
        N, T = len(lens), sum(lens)
        print(f"\n[sweep] lens={name(lens)}", flush=True)
        per_chunk = {}
        for chunk in LOCAL_TILES:
            keys = T // chunk + N
            base = tr.PrefillConfig(chunk=chunk)
            h = torch.empty(keys, H, D, D, device=DEV)
            g = torch.empty(keys, H, D, device=DEV)
            res = {}
            for bk, bv, w in LOCAL_TILES[chunk]:
                res[("local", bk, bv, w)] = timed(lambda: tr._chunk_local_kernel[(keys, H, (D // bk) * (D // bv))](
                    k, v, la, cu, h, g, k.stride(0), k.stride(1), v.stride(0), v.stride(1), la.stride(0),
                    la.stride(1), N, H=H, DK=D, DV=D, BK=bk, BV=bv, C=chunk, PREC="tf32x3", SB=tr.SPAN_SEQS,
                    num_warps=w))
            for br, w, st in SCAN_TILES[chunk]:
                res[("scan", br, w, st)] = timed(lambda: tr._chunk_scan_kernel[(N, H, D // br)](
                    pool, ids, cu, h, g, H=H, DK=D, DV=D, BR=br, BV=D, C=chunk, num_warps=w, num_stages=st))
            h = tr.prefill_states(k, v, la, cu, pool.clone(), ids, base)
            for bv, w, st in OUT_TILES[chunk]:
                cfg = replace(base, out_bv=bv, out_warps=w, out_stages=st)
                res[("out", bv, w, st)] = timed(lambda: tr.prefill_outputs(q, k, v, la, cu, h, cfg))
            for key, t in res.items():
                rows.append(dict(lens=name(lens), chunk=chunk, pass_=key[0], tile=list(key[1:]), us=round(t, 2)))
            pick = {p: min((x for x in res if x[0] == p), key=res.get) for p in ("local", "scan", "out")}
            per_chunk[chunk] = (sum(res[x] for x in pick.values()), pick)
            for p in ("local", "scan", "out"):
                print(f"  chunk {chunk} {p:<5} " + "  ".join(f"{x[1:]}:{t:.0f}" for x, t in res.items() if x[0] == p),
                      flush=True)
        chunk = min(per_chunk, key=lambda c: per_chunk[c][0])
        tot, pick = per_chunk[chunk]
        best[name(lens)] = tr.PrefillConfig(
            chunk=chunk, local_bk=pick["local"][1], local_bv=pick["local"][2], local_warps=pick["local"][3],
            scan_rows=pick["scan"][1], scan_warps=pick["scan"][2], scan_stages=pick["scan"][3],
            out_bv=pick["out"][1], out_warps=pick["out"][2], out_stages=pick["out"][3])
        print(f"  best: {best[name(lens)]} -> {tot:.1f} us (sum of the three passes)", flush=True)
    return best


def local_us(k, v, la, cu, ids, cfg) -> float:
    """Pass 1 alone, launched as prefill_states launches it."""
    T, N = k.shape[0], ids.shape[0]
    keys = T // cfg.chunk + N
    h = torch.empty(keys, H, D, D, device=DEV)
    g = torch.empty(keys, H, D, device=DEV)
    return us(lambda: tr._chunk_local_kernel[(keys, H, (D // cfg.local_bk) * (D // cfg.local_bv))](
        k, v, la, cu, h, g, k.stride(0), k.stride(1), v.stride(0), v.stride(1), la.stride(0), la.stride(1),
        N, H=H, DK=D, DV=D, BK=cfg.local_bk, BV=cfg.local_bv, C=cfg.chunk, PREC="tf32x3", SB=tr.SPAN_SEQS,
        num_warps=cfg.local_warps))


VARIANTS = {"chunk64": tr.PrefillConfig(chunk=64), "chunk128": tr.PrefillConfig(chunk=128),
            "pairwise_only": tr.PrefillConfig(factor_span=-1.)}


def variants(rows):
    """The default against single changes, and where the time goes by pass (default tiles)."""
    print("\n[variants] µs per layer call; per pass at the default config", flush=True)
    for lens in ([4096], [512] * 8, [512]):
        for strong in (False, True):
            (q, k, v, la), cu, ids, pool = inputs(lens, strong=strong)
            cfg = tr.PREFILL
            row = dict(lens=name(lens), strong_decay=strong, default_cfg=asdict(cfg),
                       default=us(lambda: tr.varlen_prefill(q, k, v, la, cu, pool, ids)))
            for label, c in VARIANTS.items():
                row[label] = us(lambda: tr.prefill_launch(q, k, v, la, cu, pool, ids, c))
            t_states = us(lambda: tr.prefill_states(k, v, la, cu, pool, ids, cfg))
            h = tr.prefill_states(k, v, la, cu, pool.clone(), ids, cfg)
            row["pass_local"] = local_us(k, v, la, cu, ids, cfg)
            row["pass_scan"] = t_states - row["pass_local"]
            row["pass_out"] = us(lambda: tr.prefill_outputs(q, k, v, la, cu, h, cfg))
            row = {key: round(x, 1) if isinstance(x, float) else x for key, x in row.items()}
            rows.append(row)
            print(f"  {name(lens):<40} strong={strong!s:<5} default {row['default']:7.1f}  "
                  + "  ".join(f"{lb} {row[lb]:.1f}" for lb in VARIANTS)
                  + f"  | local {row['pass_local']:.1f} scan {row['pass_scan']:.1f} out {row['pass_out']:.1f}",
                  flush=True)


def launch_overhead(rows):
    """Host µs per call on a 16-token prompt, no sync inside: what a launch-bound short prefill pays."""
    (q, k, v, la), cu, ids, pool = inputs([16])
    for label, fn in (("old", lambda: old_prefill(q, k, v, la, cu, pool, ids)),
                      ("new", lambda: tr.varlen_prefill(q, k, v, la, cu, pool, ids))):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(200):
            fn()
        host = (time.perf_counter() - t) / 200 * 1e6
        torch.cuda.synchronize()
        rows.append(dict(kernel=label, host_us_per_call=round(host, 1)))
        print(f"  host launch cost per varlen_prefill call, {label}: {host:.1f} us", flush=True)


# ------------------------------------------------------------------------------------------- timings

TIMED = [[512], [4096], [512] * 8, [1, 2, 63, 64, 65, 100, 1000, 333, 17], [64] * 64, [16384]]


def timings(rows, best):
    print("\n[timings] µs per layer call (H 32, d 64, bf16): old kernel, new default, new best-of-sweep", flush=True)
    for lens in TIMED:
        (q, k, v, la), cu, ids, pool = inputs(lens)
        t_old = us(lambda: old_prefill(q, k, v, la, cu, pool, ids))
        t_new = us(lambda: tr.varlen_prefill(q, k, v, la, cu, pool, ids))
        cfg = best.get(name(lens))
        t_best = us(lambda: tr.prefill_launch(q, k, v, la, cu, pool, ids, cfg)) if cfg else None
        T = sum(lens)
        nbytes = T * H * D * (2 + 2 + 2 + 4 + 2)         # q, k, v, log α read once, o written once
        rows.append(dict(lens=name(lens), old_us=round(t_old, 1), new_us=round(t_new, 1),
                         best_us=None if t_best is None else round(t_best, 1), speedup=round(t_old / t_new, 2),
                         io_bytes=nbytes, default_cfg=asdict(tr.PREFILL)))
        print(f"  {name(lens):<40} old {t_old:8.1f}  new {t_new:7.1f}  x{t_old / t_new:5.1f}"
              f"{'' if t_best is None else f'  best {t_best:7.1f}'}  (io floor {nbytes / 3.0e6:.0f} us at 3 TB/s)",
              flush=True)


# ------------------------------------------------------------------------------------------- TTFT

def ttft(rows, best_4096, lengths=(512, 4096)):
    spec = importlib.util.spec_from_file_location("decode_latency", ROOT / "bench" / "decode_latency.py")
    dl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dl)
    flops = dl.measure_matmul_rate()
    model = dl.load_full("spartacus")
    print(f"\n[TTFT] full-size synthetic Spartacus, bf16 matmul {flops / 1e12:.0f} TFLOP/s", flush=True)
    new_prefill, new_config = tr.varlen_prefill, tr.PREFILL
    variants = [("old", lambda: setattr(tr, "varlen_prefill", old_prefill)), ("new", lambda: None)]
    if best_4096 is not None:
        variants.append(("new_best", lambda: setattr(tr, "PREFILL", best_4096)))
    for label, patch in variants:
        patch()
        try:
            for r in dl.prefill_rows(model, "spartacus", list(lengths), flops):
                rows.append(dict(kernel=label, **r))
                print(f"  {label:<9} {r['prompt_tokens']:6} tokens  TTFT {r['ttft_ms']:7.2f} ms"
                      f"  (matmul floor {r['flop_floor_ms']:.2f} ms)", flush=True)
        finally:
            tr.varlen_prefill, tr.PREFILL = new_prefill, new_config
    rows.append(profile_forward(dl, model, 512))


def profile_forward(dl, model, n):
    """Wall time vs GPU kernel time of one eager n-token prefill forward (new kernels, defaults)."""
    s = dl.Setup(model, 1, 0)
    meta = dl.build_meta([dl.SeqChunk([(7 * i) % 30000 + 1 for i in range(n)], 0, [], s.meta.slot_ids.tolist()[0],
                                      True)], dl.PAGE, model.device)

    def run():
        with torch.inference_mode():
            model.forward(meta, s.pools.view)
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        run()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / 10 * 1e3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            run()
        torch.cuda.synchronize()
    ev = sorted((e for e in prof.key_averages() if e.device_time_total > 0), key=lambda e: -e.device_time_total)
    gpu = sum(e.device_time_total for e in ev) / 3 / 1e3
    top = [dict(name=e.key[:70], ms=round(e.device_time_total / 3 / 1e3, 3), calls=e.count // 3) for e in ev[:8]]
    print(f"  profile {n} tokens: wall {wall:.2f} ms per forward, GPU kernels {gpu:.2f} ms; top: "
          + ", ".join(f"{x['name'][:32]} {x['ms']}" for x in top[:5]), flush=True)
    return dict(kind="profile", prompt_tokens=n, wall_ms=round(wall, 3), gpu_ms=round(gpu, 3), top=top)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-ttft", action="store_true")
    ap.add_argument("--quick", action="store_true", help="fewer checks, no sweep, variants instead")
    args = ap.parse_args()
    torch.manual_seed(0)
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               default_config=asdict(tr.PrefillConfig()), checks=[], sweeps=[], best={}, timings=[], ttft=[])
    out = Path(os.environ.get("OUT") or ROOT / "bench" / "results") / "prefill.json"

    def save():
        out.write_text(json.dumps(res, indent=1))

    if args.quick:
        global CHECKS, TIMED
        CHECKS = [CHECKS[1], CHECKS[3], CHECKS[4], CHECKS[5]]
        TIMED = [[4096], [1, 2, 63, 64, 65, 100, 1000, 333, 17], [64] * 64, [16384]]
    check(res["checks"])
    save()
    best = {}
    if args.quick:
        res["variants"] = []
        variants(res["variants"])
        save()
    elif not args.no_sweep:
        best = sweep([[4096], [512] * 8], res["sweeps"])
        res["best"] = {k: asdict(c) for k, c in best.items()}
        save()
    timings(res["timings"], best)
    launch_overhead(res["timings"])
    save()
    if not args.no_ttft:
        try:
            ttft(res["ttft"], best.get("[4096]"))
        except Exception as e:   # noqa: BLE001 - keep the kernel results
            FAILURES.append(f"ttft: {type(e).__name__}: {e}")
        save()
    print("\nFAILURES:\n  " + "\n  ".join(FAILURES) if FAILURES else "\nall checks passed", flush=True)
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
