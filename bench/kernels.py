"""Check and time the Triton kernels against their PyTorch references at serving shapes (CUDA only).

    PYTHONUNBUFFERED=1 python3 bench/kernels.py [--quick] [--no-sweep]

Order: measure the copy-bandwidth ceiling (device-to-device copy, bytes read + written); check every
kernel against its reference at realistic shapes (relative error, fails loudly at the end); time kernel
and reference; report bytes moved, GB/s and the fraction of copy bandwidth. Decode kernels are timed as
the engine runs them, inside a CUDA graph (no launch overhead), rotating over enough slot / page sets
that the state and KV bytes stream from HBM rather than L2; prefill uses triton.testing.do_bench
(median, L2 flushed before each call). Tile configs are swept so the defaults in the kernel files are
set from data. Writes JSON to
$OUT/kernels.json, or bench/results/kernels.json when OUT is unset.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from hybridserve.kernels import gated_delta as gdn_ref
from hybridserve.kernels import gated_delta_triton as gdn_tr
from hybridserve.kernels import monoid as monoid_ref
from hybridserve.kernels import monoid_triton as monoid_tr
from hybridserve.kernels import paged_attention as attn_ref
from hybridserve.kernels import paged_attention_triton as attn_tr
from hybridserve.kernels import short_conv as conv_ref
from hybridserve.kernels import short_conv_triton as conv_tr
from hybridserve.models.batch import BatchMeta

DEV = "cuda"
BF16 = torch.bfloat16
ROWS: list[dict] = []
SWEEPS: list[dict] = []
FAILURES: list[str] = []
COPY_GBPS = 0.0


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def bench_us(fn, rep_ms: int = 60) -> float:
    """Median µs per call with L2 flushed before each call (prefill-sized work)."""
    return do_bench(fn, warmup=10, rep=rep_ms, return_mode="median") * 1e3


def graph_us(calls, replays: int = 20) -> float:
    """Median µs per call of a CUDA graph replaying `calls` back to back, the way the engine runs a
    decode step (no launch overhead). Each call addresses different slots / pages, so together they
    overflow L2 and the state really streams from HBM."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return sorted(times)[len(times) // 2] * 1e3 / len(calls)


def ref_graph_us(calls) -> float | None:
    try:
        return graph_us(calls, replays=5)
    except Exception as e:   # a reference that cannot be captured is timed eagerly
        print(f"    (reference not capturable: {type(e).__name__}; timed eagerly)", flush=True)
        return bench_us(calls[0])


def rotation(B: int, bytes_per_row: int, target: int = 150 << 20, cap: int = 256) -> list[torch.Tensor]:
    """Slot-id sets for graph timing: disjoint live slots (1..), enough sets to overflow L2; the last
    row of each set is a pad row (slot 0) when B > 1."""
    n = max(1, min(cap, -(-target // (B * bytes_per_row))))
    perm = torch.randperm(n * B, device=DEV) + 1
    sets = [perm[i * B:(i + 1) * B].clone() for i in range(n)]
    if B > 1:
        for ids in sets:
            ids[-1] = 0
    return sets


def record(kernel: str, shape: str, nbytes: int, t_us: float, ref_us: float | None, err: float | None,
           limit: float | None, flops: float | None = None, **extra) -> None:
    ok = err is None or (err == err and err < limit)
    if not ok:
        FAILURES.append(f"{kernel} {shape}: rel err {err:.3g} > {limit}")
    gbps = nbytes / t_us / 1e3
    row = dict(kernel=kernel, shape=shape, us=round(t_us, 2), bytes=nbytes, gbps=round(gbps, 1),
               frac_copy=round(gbps / COPY_GBPS, 3), ref_us=None if ref_us is None else round(ref_us, 2),
               speedup=None if ref_us is None else round(ref_us / t_us, 2),
               rel_err=None if err is None else float(f"{err:.3g}"), ok=ok, **extra)
    if flops:
        row["tflops"] = round(flops / t_us / 1e6, 1)
    ROWS.append(row)
    print(f"  {kernel:<22} {shape:<34} {t_us:9.1f} us {gbps:8.0f} GB/s {row['frac_copy']:5.2f} of copy"
          f"  ref {row['ref_us'] if ref_us else '-':>9} us  x{row['speedup'] or '-'}  err {row['rel_err']}"
          f"{'' if ok else '  FAIL'}", flush=True)


def copy_bandwidth() -> float:
    n = 1 << 30
    x = torch.empty(n, dtype=torch.uint8, device=DEV).random_(0, 255)
    y = torch.empty_like(x)
    t = bench_us(lambda: y.copy_(x), 200)
    gbps = 2 * n / t / 1e3
    print(f"copy ceiling: 1 GiB D2D in {t:.1f} us -> {gbps:.0f} GB/s (read + write)", flush=True)
    del x, y
    return gbps


def check_state(name, pool_t, pool_r, pool0, ids) -> float:
    """Relative error over the addressed live slots; unaddressed slots must be bit-identical."""
    live = ids[ids != 0]
    mask = torch.ones(pool0.shape[0], dtype=torch.bool, device=DEV)
    mask[ids] = False
    if not torch.equal(pool_t[mask], pool0[mask]):
        FAILURES.append(f"{name}: an unaddressed slot changed")
    return rel(pool_t[live], pool_r[live])


# ------------------------------------------------------------------------------------- monoid

def monoid_inputs(n, H, d):
    q = (torch.randn(n, H, d, device=DEV) * d ** -0.5).to(BF16)
    k = F.silu(torch.randn(n, H, d, device=DEV)).to(BF16)
    v = torch.randn(n, H, d, device=DEV).to(BF16)
    log_a = F.logsigmoid(torch.randn(n, H, d, device=DEV) * 2 + 2)
    return q, k, v, log_a


def bench_monoid(batches, sweep: bool):
    H, d = 32, 64
    print("\n[monoid decode] Spartacus H 32, d 64, bf16 I/O, fp32 state", flush=True)
    if sweep:
        for B in (1, 256):
            sets = rotation(B, H * d * d * 4)
            pool = torch.randn(len(sets) * B + 1, H, d, d, device=DEV)
            inp = monoid_inputs(B, H, d)
            for BV in (16, 32, 64):
                for w in (1, 2, 4, 8):
                    t = graph_us([lambda i=i: monoid_tr.decode_launch(*inp, pool, i, BV, w) for i in sets], 10)
                    SWEEPS.append(dict(kernel="monoid.decode", B=B, BV=BV, num_warps=w, us=round(t, 2)))
            best = min((s for s in SWEEPS if s["kernel"] == "monoid.decode" and s["B"] == B), key=lambda s: s["us"])
            print(f"  sweep B={B}: best BV={best['BV']} warps={best['num_warps']} {best['us']} us", flush=True)
    for B in batches:
        sets = rotation(B, H * d * d * 4)
        pool = torch.randn(len(sets) * B + 1, H, d, d, device=DEV)
        ids = sets[0]
        inp = monoid_inputs(B, H, d)
        pt, pr = pool.clone(), pool.clone()
        o_t = monoid_tr.decode_step(*inp, pt, ids)
        o_r = monoid_ref.decode_step(*inp, pr, ids)
        live = ids != 0
        err = max(rel(o_t[live], o_r[live]), check_state("monoid.decode", pt, pr, pool, ids) * 10)
        del pt, pr
        t = graph_us([lambda i=i: monoid_tr.decode_step(*inp, pool, i) for i in sets])
        tr = ref_graph_us([lambda i=i: monoid_ref.decode_step(*inp, pool, i) for i in sets])
        nbytes = B * H * (2 * d * d * 4 + d * (2 + 2 + 4) + d * (2 + 2))
        record("monoid.decode", f"B={B}", nbytes, t, tr, err, 1e-2, sets=len(sets))

    print("\n[monoid prefill]", flush=True)
    cases = [[4096], [512] * 8, [1, 100, 1000, 333, 17]]
    # the prefill tile sweep lives in bench/prefill.py
    for lens in cases:
        N, T = len(lens), sum(lens)
        pool = torch.randn(N + 1, H, d, d, device=DEV) * 0.1
        ids = torch.randperm(N, device=DEV) + 1
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
        inp = monoid_inputs(T, H, d)
        pt, pr = pool.clone(), pool.clone()
        o_t = monoid_tr.varlen_prefill(*inp, cu, pt, ids)
        o_r = monoid_ref.varlen_prefill(*inp, cu, pr, ids)
        err = max(rel(o_t, o_r), check_state("monoid.prefill", pt, pr, pool, ids))
        t = bench_us(lambda: monoid_tr.varlen_prefill(*inp, cu, pool, ids))
        tr = bench_us(lambda: monoid_ref.varlen_prefill(*inp, cu, pool, ids), 200)
        nbytes = T * H * d * (2 + 2 + 4 + 2 + 2) + N * H * d * d * 8
        record("monoid.prefill", f"lens={lens if N <= 5 else f'{N}x{lens[0]}'}", nbytes, t, tr, err, 1e-2)


# ------------------------------------------------------------------------------------- gated delta

def gdn_inputs(n, Hk, Hv, dk, dv):
    q = (F.normalize(torch.randn(n, Hk, dk, device=DEV), dim=-1) * dk ** -0.5).to(BF16)
    k = F.normalize(torch.randn(n, Hk, dk, device=DEV), dim=-1).to(BF16)
    v = torch.randn(n, Hv, dv, device=DEV).to(BF16)
    g = -F.softplus(torch.randn(n, Hv, device=DEV)) * 0.5
    beta = torch.sigmoid(torch.randn(n, Hv, device=DEV))
    return q, k, v, g, beta


def bench_gdn(batches, sweep: bool):
    Hk, dk, Hv, dv = 8, 32, 16, 32
    print("\n[gated delta decode] NeoLLM Hk 8 dk 32 Hv 16 dv 32", flush=True)
    if sweep:
        for B in (1, 256):
            sets = rotation(B, Hv * dk * dv * 4)
            pool = torch.randn(len(sets) * B + 1, Hv, dk, dv, device=DEV)
            inp = gdn_inputs(B, Hk, Hv, dk, dv)
            for BV in (8, 16, 32):
                for w in (1, 2, 4):
                    t = graph_us([lambda i=i: gdn_tr.decode_launch(*inp, pool, i, BV, w) for i in sets], 10)
                    SWEEPS.append(dict(kernel="gdn.decode", B=B, BV=BV, num_warps=w, us=round(t, 2)))
            best = min((s for s in SWEEPS if s["kernel"] == "gdn.decode" and s["B"] == B), key=lambda s: s["us"])
            print(f"  sweep B={B}: best BV={best['BV']} warps={best['num_warps']} {best['us']} us", flush=True)
    for B in batches:
        sets = rotation(B, Hv * dk * dv * 4)
        pool = torch.randn(len(sets) * B + 1, Hv, dk, dv, device=DEV)
        ids = sets[0]
        inp = gdn_inputs(B, Hk, Hv, dk, dv)
        pt, pr = pool.clone(), pool.clone()
        o_t = gdn_tr.decode_step(*inp, pt, ids)
        o_r = gdn_ref.decode_step(*inp, pr, ids)
        live = ids != 0
        err = max(rel(o_t[live], o_r[live]), check_state("gdn.decode", pt, pr, pool, ids) * 10)
        del pt, pr
        t = graph_us([lambda i=i: gdn_tr.decode_step(*inp, pool, i) for i in sets])
        tr = ref_graph_us([lambda i=i: gdn_ref.decode_step(*inp, pool, i) for i in sets])
        nbytes = B * (Hv * dk * dv * 8 + 2 * Hk * dk * 2 + Hv * dv * 4 + Hv * 8)
        record("gdn.decode", f"B={B}", nbytes, t, tr, err, 1e-2, sets=len(sets))

    print("\n[gated delta prefill]", flush=True)
    if sweep:
        pool = torch.randn(2, Hv, dk, dv, device=DEV)
        ids = torch.tensor([1], device=DEV)
        cu = torch.tensor([0, 4096], dtype=torch.int32, device=DEV)
        inp = gdn_inputs(4096, Hk, Hv, dk, dv)
        for BV in (8, 16, 32):
            for w in (1, 2):
                t = bench_us(lambda: gdn_tr.prefill_launch(*inp, cu, pool, ids, BV, w), 60)
                SWEEPS.append(dict(kernel="gdn.prefill", T=4096, BV=BV, num_warps=w, us=round(t, 2)))
                print(f"  sweep T=4096 BV={BV} warps={w}: {t:.1f} us", flush=True)
    for lens in ([4096], [512] * 8, [1, 100, 1000, 333, 17]):
        N, T = len(lens), sum(lens)
        pool = torch.randn(N + 1, Hv, dk, dv, device=DEV) * 0.1
        ids = torch.randperm(N, device=DEV) + 1
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
        inp = gdn_inputs(T, Hk, Hv, dk, dv)
        pt, pr = pool.clone(), pool.clone()
        o_t = gdn_tr.varlen_prefill(*inp, cu, pt, ids)
        o_r = gdn_ref.varlen_prefill(*inp, cu, pr, ids)
        err = max(rel(o_t, o_r), check_state("gdn.prefill", pt, pr, pool, ids))
        t = bench_us(lambda: gdn_tr.varlen_prefill(*inp, cu, pool, ids))
        tr = bench_us(lambda: gdn_ref.varlen_prefill(*inp, cu, pool, ids), 200)
        nbytes = T * (2 * Hk * dk * 2 + Hv * dv * 4 + Hv * 8) + N * Hv * dk * dv * 8
        record("gdn.prefill", f"lens={lens if N <= 5 else f'{N}x{lens[0]}'}", nbytes, t, tr, err, 1e-2)


# ------------------------------------------------------------------------------------- short conv

def bench_conv(batches):
    C, K = 1024, 4
    print("\n[short conv] NeoLLM conv_dim 1024, K 4, bf16", flush=True)
    w = torch.randn(C, K, device=DEV).to(BF16)
    for B in batches:
        sets = rotation(B, C * (K - 1) * 2, cap=64)
        pool = torch.randn(len(sets) * B + 1, C, K - 1, device=DEV).to(BF16)
        ids = sets[0]
        x = torch.randn(B, C, device=DEV).to(BF16)
        pt, pr = pool.clone(), pool.clone()
        live = ids != 0
        err = max(rel(conv_tr.decode_step(x, w, pt, ids)[live], conv_ref.decode_step(x, w, pr, ids)[live]),
                  check_state("conv.decode", pt, pr, pool, ids))
        t = graph_us([lambda i=i: conv_tr.decode_step(x, w, pool, i) for i in sets])
        tr = ref_graph_us([lambda i=i: conv_ref.decode_step(x, w, pool, i) for i in sets])
        record("conv.decode", f"B={B}", B * C * ((K - 1) * 4 + 4), t, tr, err, 1e-2, sets=len(sets))
    for lens in ([4096], [512] * 8, [1, 2, 1000, 333, 17]):
        N, T = len(lens), sum(lens)
        pool = torch.randn(N + 1, C, K - 1, device=DEV).to(BF16)
        ids = torch.randperm(N, device=DEV) + 1
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
        x = torch.randn(T, C, device=DEV).to(BF16)
        pt, pr = pool.clone(), pool.clone()
        err = max(rel(conv_tr.varlen_prefill(x, w, cu, pt, ids), conv_ref.varlen_prefill(x, w, cu, pr, ids)),
                  check_state("conv.prefill", pt, pr, pool, ids))
        t = bench_us(lambda: conv_tr.varlen_prefill(x, w, cu, pool, ids))
        tr = bench_us(lambda: conv_ref.varlen_prefill(x, w, cu, pool, ids))
        record("conv.prefill", f"lens={lens if N <= 5 else f'{N}x{lens[0]}'}", T * C * 4 + N * C * (K - 1) * 4,
               t, tr, err, 1e-2)


# ------------------------------------------------------------------------------------- paged attention

def paged(ctx: list[int], Hkv: int, D: int, page: int, extra_blocks: int = 0):
    """KV caches holding exactly these contexts in shuffled pages (page 0 left as the pad page)."""
    blocks = [-(-c // page) for c in ctx]
    num_pages = sum(blocks) + 1
    k_cache = torch.randn(num_pages, page, Hkv, D, device=DEV, dtype=BF16)
    v_cache = torch.randn(num_pages, page, Hkv, D, device=DEV, dtype=BF16)
    perm = (torch.randperm(num_pages - 1, device=DEV) + 1).to(torch.int32)
    bt = torch.zeros(len(ctx), max(blocks) + extra_blocks, dtype=torch.int32, device=DEV)
    at = 0
    for b, n in enumerate(blocks):
        bt[b, :n] = perm[at:at + n]
        at += n
    return k_cache, v_cache, bt


def meta(qlens, ctx, bt, is_decode):
    cu = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    return BatchMeta(input_ids=torch.zeros(sum(qlens), dtype=torch.long, device=DEV), positions=None,
                     cu_seqlens=cu, seq_lens=torch.tensor(ctx, dtype=torch.int32, device=DEV), block_tables=bt,
                     slot_mapping=None, slot_ids=None, logits_indices=None, query_lens_cpu=list(qlens),
                     seq_lens_cpu=list(ctx), is_decode=is_decode)


def bench_attention(quick: bool, sweep: bool):
    H, Hkv, D, page = 32, 8, 64, 16
    defaults = attn_tr.BLOCK_N, attn_tr.NUM_WARPS, attn_tr.TARGET_PROGRAMS
    scale = D ** -0.5
    print("\n[paged attention decode] Llama-3.2-1B-like: 32 q / 8 kv heads, head_dim 64, page 16, bf16", flush=True)
    cases = [(1, 1024), (1, 8192), (1, 65536), (16, 4096), (64, 1024), (64, 16384), (256, 1024), (256, 4096)]
    if quick:
        cases = [(1, 1024), (1, 65536), (64, 4096)]
    for B, L in cases:
        n_sets = max(1, min(64, -(-(150 << 20) // (B * L * Hkv * D * 4))))
        k_cache, v_cache, bt_all = paged([L] * (B * n_sets), Hkv, D, page)
        tables = [bt_all[i * B:(i + 1) * B] for i in range(n_sets)]
        bt = tables[0]
        q = torch.randn(B, H, D, device=DEV, dtype=BF16)
        lens = torch.full((B,), L, dtype=torch.int32, device=DEV)
        o, lse = attn_tr.decode(q, k_cache, v_cache, bt, lens, scale, return_lse=True)
        err, tr = None, None
        if B * L <= 1 << 20:                      # the reference materialises [B, H, L, D] twice
            m = meta([1] * B, [L] * B, bt, True)
            err = rel(o, attn_ref.reference(q, k_cache, v_cache, m, scale))
            if B * L <= 1 << 17:                  # the lse path of the reference loops per sequence
                err = max(err, rel(lse, attn_ref.reference(q, k_cache, v_cache, m, scale, return_lse=True)[1]))
            metas = [meta([1] * B, [L] * B, t, True) for t in tables]
            tr = ref_graph_us([lambda m=m: attn_ref.reference(q, k_cache, v_cache, m, scale) for m in metas])
        calls = [lambda t=t: attn_tr.decode(q, k_cache, v_cache, t, lens, scale) for t in tables]
        t = graph_us(calls)
        splits = attn_tr.num_splits_for(B, Hkv, bt.shape[1] * page, attn_tr.target_programs(q.device, D))
        nbytes = B * L * Hkv * D * 4 + B * H * D * 4
        record("attn.decode", f"B={B} ctx={L}", nbytes, t, tr, err, 2e-2, splits=splits, sets=n_sets)
        if sweep and (B, L) in ((1, 65536), (1, 8192), (64, 4096), (256, 1024)):
            for bn, w, target in ((32, 4, 1024), (64, 2, 1024), (64, 8, 1024), (128, 4, 1024), (128, 8, 1024),
                                  (64, 4, 512), (64, 4, 2048), (64, 4, 4096)):
                attn_tr.BLOCK_N, attn_tr.NUM_WARPS, attn_tr.TARGET_PROGRAMS = bn, w, target
                ts = graph_us(calls, 10)
                SWEEPS.append(dict(kernel="attn.decode", B=B, ctx=L, BLOCK_N=bn, num_warps=w, target=target,
                                   us=round(ts, 2)))
                print(f"    sweep BLOCK_N={bn} warps={w} target={target}: {ts:.1f} us", flush=True)
            attn_tr.BLOCK_N, attn_tr.NUM_WARPS, attn_tr.TARGET_PROGRAMS = defaults
        del k_cache, v_cache, bt_all, tables

    # decode graphs are captured with the block-table width of the longest context: check that cost
    B, L, width = 64, 1024, 4096
    k_cache, v_cache, bt = paged([L] * B, Hkv, D, page, extra_blocks=width - L // page)
    q = torch.randn(B, H, D, device=DEV, dtype=BF16)
    lens = torch.full((B,), L, dtype=torch.int32, device=DEV)
    t = graph_us([lambda: attn_tr.decode(q, k_cache, v_cache, bt, lens, scale)])
    splits = attn_tr.num_splits_for(B, Hkv, width * page, attn_tr.target_programs(q.device, D))
    record("attn.decode", f"B={B} ctx={L} table={width * page}", B * L * Hkv * D * 4, t, None, None, None,
           splits=splits)
    del k_cache, v_cache

    print("\n[paged attention prefill] causal over pages (+ prefix), lse", flush=True)
    for qlens, ctx in (([4096], [4096]), ([512], [8192]), ([512] * 8, [2048] * 8), ([1, 300, 2000], [50, 300, 6000])):
        k_cache, v_cache, bt = paged(ctx, Hkv, D, page)
        T = sum(qlens)
        q = torch.randn(T, H, D, device=DEV, dtype=BF16)
        m = meta(qlens, ctx, bt, False)
        o, lse = attn_tr.varlen_prefill(q, k_cache, v_cache, m.cu_seqlens, m.seq_lens, bt, scale, max(qlens),
                                        return_lse=True)
        o_r, lse_r = attn_ref.reference(q, k_cache, v_cache, m, scale, return_lse=True)
        err = max(rel(o, o_r), rel(lse, lse_r))
        t = bench_us(lambda: attn_tr.varlen_prefill(q, k_cache, v_cache, m.cu_seqlens, m.seq_lens, bt, scale,
                                                    max(qlens)))
        tr = bench_us(lambda: attn_ref.reference(q, k_cache, v_cache, m, scale), 200)
        flops = sum(4 * H * D * (c - ql) * ql + 2 * H * D * ql * ql for ql, c in zip(qlens, ctx))
        nbytes = sum(c for c in ctx) * Hkv * D * 4 + T * H * D * 4
        record("attn.prefill", f"q={qlens} ctx={ctx}", nbytes, t, tr, err, 2e-2, flops=flops)
        del k_cache, v_cache


def start(script: str):
    """The device's properties after the run's header line and the copy ceiling (COPY_GBPS); None without
    CUDA."""
    global COPY_GBPS
    if not torch.cuda.is_available():
        print(f"{script} needs CUDA")
        return None
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}")
    COPY_GBPS = copy_bandwidth()
    return props


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--no-sweep", action="store_true", help="skip the tile-config sweeps")
    args = ap.parse_args()
    t0 = time.time()
    props = start("bench/kernels.py")
    if props is None:
        return 2
    batches = (1, 16, 256) if args.quick else (1, 8, 32, 64, 128, 256)
    sweep = not args.no_sweep
    sections = [("monoid", lambda: bench_monoid(batches, sweep)), ("gdn", lambda: bench_gdn(batches, sweep)),
                ("conv", lambda: bench_conv(batches)), ("attention", lambda: bench_attention(args.quick, sweep))]
    for name, fn in sections:
        try:
            fn()
        except Exception as e:  # keep going: one broken kernel must not hide the others' numbers
            FAILURES.append(f"{name}: {type(e).__name__}: {e}")
            print(f"!! {name} raised {type(e).__name__}: {e}", flush=True)
        torch.cuda.empty_cache()

    result = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                  triton=triton.__version__, copy_gbps=round(COPY_GBPS, 1), rows=ROWS, sweeps=SWEEPS,
                  failures=FAILURES, wall_s=round(time.time() - t0, 1),
                  defaults=dict(monoid=dict(decode_bv=monoid_tr.DECODE_BV, decode_warps=monoid_tr.DECODE_WARPS,
                                            prefill=asdict(monoid_tr.PrefillConfig())),
                                gdn=dict(decode_bv=gdn_tr.DECODE_BV, decode_warps=gdn_tr.DECODE_WARPS,
                                         prefill_bv=gdn_tr.PREFILL_BV, prefill_warps=gdn_tr.PREFILL_WARPS),
                                attn=dict(block_n=attn_tr.BLOCK_N, num_warps=attn_tr.NUM_WARPS,
                                          target_programs=attn_tr.TARGET_PROGRAMS, min_split=attn_tr.MIN_SPLIT)))
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).resolve().parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "kernels.json").write_text(json.dumps(result, indent=1))

    print(f"\n{props.name}  copy {COPY_GBPS:.0f} GB/s  torch {torch.__version__}  triton {triton.__version__}")
    print(f"{'kernel':<15} {'shape':<36} {'us':>9} {'GB/s':>7} {'/copy':>6} {'ref us':>9} {'x':>7} {'err':>8}")
    for r in ROWS:
        print(f"{r['kernel']:<15} {r['shape'][:36]:<36} {r['us']:>9} {r['gbps']:>7} {r['frac_copy']:>6} "
              f"{r['ref_us'] if r['ref_us'] is not None else '-':>9} {r['speedup'] or '-':>7} "
              f"{r['rel_err'] if r['rel_err'] is not None else '-':>8}{'' if r['ok'] else ' FAIL'}")
    if FAILURES:
        print("\nFAILURES:\n  " + "\n  ".join(FAILURES))
        return 1
    print(f"\nall checks passed ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
