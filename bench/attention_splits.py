"""How many (sequence, kv head, split) programs the decode attention should launch: a sweep of
`paged_attention_triton.TARGET_PROGRAMS` over the served models' attention shapes, batches and contexts.

    PYTHONUNBUFFERED=1 python3 bench/attention_splits.py [--targets 264,528,1024] [--quick]

Each case is the split kernel + merge kernel as a decode graph runs them: the block table as wide as
`--table` tokens (the engine captures its graphs at the model's context), tables rotated over enough
sequences that the KV bytes stream from HBM, timed as a CUDA graph (bench/kernels.py's graph_us). Target
0 is the kernel's own rule (one wave: SMs × programs per SM); the baseline is a fixed 1024 (the rule
before it), timed in the same run; every row also carries the KV bytes over the measured copy bandwidth.
Writes $OUT/attention_splits.json (or bench/results/).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import triton

import kernels as kb
from hybridserve.kernels import paged_attention_triton as attn_tr

SHAPES = {"nanohammer": (32, 8, 64), "kotodama-3b": (24, 8, 128), "smollm2": (9, 3, 64),
          "kotodama-108m": (4, 2, 128)}          # (q heads, kv heads, head dim)
PAGE = 16


BASELINE = 1024


def case(H: int, Hkv: int, D: int, B: int, L: int, table: int, targets: list[int]) -> list[dict]:
    n_sets = max(1, min(64, -(-(200 << 20) // (B * L * Hkv * D * 4))))
    width = max(-(-table // PAGE), -(-L // PAGE))
    k_cache, v_cache, bt_all = kb.paged([L] * (B * n_sets), Hkv, D, PAGE, extra_blocks=width - (-(-L // PAGE)))
    tables = [bt_all[i * B:(i + 1) * B] for i in range(n_sets)]
    q = torch.randn(B, H, D, device=kb.DEV, dtype=kb.BF16)
    lens = torch.full((B,), L, dtype=torch.int32, device=kb.DEV)
    scale = D ** -0.5
    calls = [lambda t=t: attn_tr.decode(q, k_cache, v_cache, t, lens, scale) for t in tables]
    nbytes = B * L * Hkv * D * 4
    default = attn_tr.TARGET_PROGRAMS
    rows = []
    try:
        attn_tr.TARGET_PROGRAMS = BASELINE
        want = attn_tr.decode(q, k_cache, v_cache, tables[0], lens, scale)
        for target in targets:
            attn_tr.TARGET_PROGRAMS = target or None
            got = attn_tr.decode(q, k_cache, v_cache, tables[0], lens, scale)
            err = kb.rel(got, want)
            us = kb.graph_us(calls, 10)
            programs = attn_tr.target_programs(q.device, D)
            rows.append(dict(B=B, ctx=L, table=width * PAGE, target=target, programs=programs,
                             splits=attn_tr.num_splits_for(B, Hkv, width * PAGE, programs), us=round(us, 2),
                             gbps=round(nbytes / us / 1e3, 1), frac_copy=round(nbytes / us / 1e3 / kb.COPY_GBPS, 3),
                             rel_err_vs_baseline=float(f"{err:.3g}")))
    finally:
        attn_tr.TARGET_PROGRAMS = default
    base = next(r["us"] for r in rows if r["target"] == BASELINE)
    for r in rows:
        r["ratio_to_baseline"] = round(r["us"] / base, 3)
    best = min(rows, key=lambda r: r["us"])
    rule = next(r for r in rows if r["target"] == 0)
    print(f"  B={B:3} ctx={L:6} " + "  ".join(f"{r['target'] or 'rule'}:{r['us']:.1f}" for r in rows)
          + f"   rule {rule['ratio_to_baseline']:.3f} of {BASELINE} ({rule['frac_copy']:.2f} of copy), best "
          f"{best['target'] or 'rule'} ({best['ratio_to_baseline']:.3f})", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--batches", default="1,2,4,8,16,32,64")
    ap.add_argument("--contexts", default="512,2048,8192,32768")
    ap.add_argument("--max-tokens", type=int, default=1 << 19, help="skip cases with more context tokens in all")
    ap.add_argument("--table", type=int, default=32768, help="block-table width in tokens (the graph's)")
    ap.add_argument("--targets", default="0,264,396,528,660,1024", help="0: the kernel's rule")
    args = ap.parse_args()
    t0 = time.time()
    props = kb.start("bench/attention_splits.py")
    if props is None:
        return 2
    targets = sorted({int(t) for t in args.targets.split(",")} | {0, BASELINE})
    result = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                  triton=triton.__version__, copy_gbps=round(kb.COPY_GBPS, 1), baseline=BASELINE,
                  block_n=attn_tr.BLOCK_N, num_warps=attn_tr.NUM_WARPS, rows=[])
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).resolve().parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in args.shapes.split(","):
        H, Hkv, D = SHAPES[name]
        print(f"\n[{name}] {H} q / {Hkv} kv heads, head dim {D}, table {args.table} tokens", flush=True)
        for L in (int(c) for c in args.contexts.split(",")):
            for B in (int(b) for b in args.batches.split(",")):
                if B * L > args.max_tokens:
                    continue
                rows = case(H, Hkv, D, B, L, args.table, targets)
                result["rows"] += [dict(shape=name, **r) for r in rows]
                torch.cuda.empty_cache()
        result["wall_s"] = round(time.time() - t0, 1)
        (out_dir / "attention_splits.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
