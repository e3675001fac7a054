"""Matmuls of 2–128 rows (decode batches above one): the Triton multi-row GEMM (kernels/fused_triton.py
`_matmul`, weight streamed once, SiLU·mul / fp32-cast epilogues) over a grid of tiles, against cuBLAS
(F.linear, plus the separate SiLU·mul or cast kernel it needs) on Spartacus-1.4B's shapes, and the copy
bandwidth floor of each weight. Each timing is a CUDA graph over enough weight copies to miss L2.

Usage (GPU machine): python bench/gemm_rows.py [--rows 4,16,128]  → $OUT/gemm_rows.json (or bench/results/).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from gemv_chain import copy_bandwidth, graph_us
from hybridserve.kernels import fused_triton as ft

HIDDEN, INTER, VOCAB = 2048, 8192, 128256
SHAPES = [  # name, N (outputs), K, gated (the weight stacks 2N rows), fp32 out
    ("qkvz", 4 * HIDDEN, HIDDEN, False, False), ("o", HIDDEN, HIDDEN, False, False),
    ("gate_up", INTER, HIDDEN, True, False), ("down", HIDDEN, INTER, False, False),
    ("head", VOCAB, HIDDEN, False, True)]


def configs(M: int):
    BM = max(16, 1 << (M - 1).bit_length())
    if BM <= 32:
        return [(BM, bn, bk, 4, st) for bn in (16, 32, 64) for bk in (128, 256) for st in (3, 5)]
    return [(BM, bn, bk, w, st) for bn in (32, 64, 128) for bk in (64, 128) for w in (4, 8) for st in (3, 4)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="4,16,128")
    args = ap.parse_args()
    bw = copy_bandwidth()
    default_rule = ft.mm_config
    rows, best = [], {}
    for M in [int(m) for m in args.rows.split(",")]:
        for name, N, K, gated, f32 in SHAPES:
            rows_w = 2 * N if gated else N
            copies = max(1, -(-(256 << 20) // (rows_w * K * 2)))
            ws = [(torch.randn(rows_w, K, device="cuda") * K ** -0.5).to(torch.bfloat16) for _ in range(copies)]
            x = torch.randn(M, K, device="cuda").to(torch.bfloat16)
            reps = max(copies, 8)
            out_dtype = torch.float32 if f32 else None

            def cublas(i):
                y = F.linear(x, ws[i % copies])
                y = ft.silu_mul(y) if gated else y
                return y.float() if f32 else y

            def ours(i):
                return ft._matmul(x, ws[i % copies], out_dtype, gated)
            want = cublas(0).float()
            floor = 1e6 * rows_w * K * 2 / bw
            t_cublas = graph_us(lambda: [cublas(i) for i in range(reps)]) / reps
            rows.append({"shape": name, "M": M, "N": rows_w, "K": K, "config": "cublas", "us": t_cublas,
                         "floor_us": floor})
            cands = [("default", default_rule(M, N, K, 2 if gated else 1))] + [(c, c) for c in configs(M)]
            for label, cfg in cands:
                if cfg is None:
                    continue
                ft.mm_config = lambda *shape, c=cfg: c
                try:
                    err = ((ours(0).float() - want).norm() / want.norm()).item()
                    t = graph_us(lambda: [ours(i) for i in range(reps)]) / reps
                except Exception as e:  # a tile that does not fit (shared memory): noted, skipped
                    rows.append({"shape": name, "M": M, "config": str(label), "error": str(e)[:200]})
                    continue
                finally:
                    ft.mm_config = default_rule
                assert err < 1e-2, (name, M, cfg, err)
                rows.append({"shape": name, "M": M, "N": rows_w, "K": K, "config": str(label), "tile": list(cfg),
                             "us": t, "floor_us": floor, "vs_cublas": t / t_cublas, "rel_err": err})
                if label != "default" and ((name, M) not in best or t < best[(name, M)][1]):
                    best[(name, M)] = (cfg, t)
            d = next((r for r in rows if r["shape"] == name and r["M"] == M and r["config"] == "default"), None)
            b = best.get((name, M))
            print(f"M={M:4} {name:8} {rows_w:6}x{K:5}: cublas {t_cublas:7.1f} us | default "
                  f"{d['us'] if d else float('nan'):7.1f} | best {b[0] if b else None} {b[1] if b else 0:7.1f} | "
                  f"floor {floor:6.1f}", flush=True)
            del ws
            torch.cuda.empty_cache()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bandwidth_Bps": bw,
           "rows": rows, "best": [{"shape": k[0], "M": k[1], "tile": list(v[0]), "us": v[1]} for k, v in best.items()]}
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    (out_dir / "gemm_rows.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
