"""What a chain of dependent kernels costs on its own, for the small models whose decode step is latency-bound.

- empty chain: N kernels that each read one number the previous kernel wrote and write it back + 1, replayed
  as one CUDA graph, with and without programmatic dependent launch: the per-kernel price of a dependency.
- Kotodama-108M matmul chain: only the step's matmuls (28 layers x qkv, o, gate_up + SiLU·mul, down, then
  the 49k-row head; 213 MB), the same kernels the engine runs, against the copy-bandwidth floor of those
  bytes. The step's other kernels (routing, RoPE + KV write, attention) come on top.

Usage (GPU machine): python bench/launch_chain.py  → $OUT/launch_chain.json (or bench/results/).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from gemv_chain import copy_bandwidth, graph_us, set_pdl
from hybridserve.kernels import fused_triton as ft
from hybridserve.kernels import pdl

HIDDEN, INTER, LAYERS, VOCAB, QKV = 512, 1408, 28, 49152, 1024


@triton.jit
def _bump(x_ptr, PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    tl.store(x_ptr, tl.load(x_ptr) + 1)


def empty_chain(n: int) -> list[dict]:
    x = torch.zeros(1, dtype=torch.int32, device="cuda")
    rows = []
    for on in (False, True):
        set_pdl(on)
        kw = pdl.launch_kwargs(x.device)

        def chain():
            for _ in range(n):
                _bump[(1,)](x, **kw)
        x.zero_()
        chain()
        torch.cuda.synchronize()
        assert int(x.item()) == n, x.item()
        t = graph_us(chain)
        rows.append({"variant": f"empty kernel chain pdl={int(pdl.enabled(x.device))}", "kernels": n, "us": t,
                     "us_per_kernel": t / n})
        print(f"{rows[-1]['variant']:34} {n} kernels {t:8.1f} us = {t / n:.2f} us each", flush=True)
    set_pdl(True)
    return rows


def kotodama_chain(bw: float) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(0)

    def w(n, k):
        return (torch.randn(n, k, device="cuda", generator=g) * k ** -0.5).to(torch.bfloat16)
    layers = [dict(qkv=w(QKV, HIDDEN), o=w(HIDDEN, HIDDEN), gate_up=w(2 * INTER, HIDDEN), down=w(HIDDEN, INTER),
                   n1=torch.rand(HIDDEN, device="cuda").to(torch.bfloat16) + 0.5,
                   n2=torch.rand(HIDDEN, device="cuda").to(torch.bfloat16) + 0.5) for _ in range(LAYERS)]
    head = w(VOCAB, HIDDEN)
    nbytes = sum(t.numel() * 2 for lw in layers for t in lw.values()) + head.numel() * 2
    x = torch.randn(1, HIDDEN, device="cuda").to(torch.bfloat16)

    def ours():
        h, delta = x, None
        for lw in layers:
            h, qkv = ft.add_norm_linear(h, delta, lw["n1"], lw["qkv"], 1e-5)
            h, gu = ft.add_norm_linear_silu_mul(h, ft.linear(qkv[:, :HIDDEN], lw["o"]), lw["n2"], lw["gate_up"], 1e-5)
            delta = ft.linear(gu, lw["down"])
        return ft.add_norm_linear(h, delta, layers[0]["n1"], head, 1e-5, out_dtype=torch.float32)[1]

    def cublas():
        h = x
        for lw in layers:
            a = F.linear(F.linear(h, lw["qkv"])[:, :HIDDEN], lw["o"])
            gu = F.linear(a, lw["gate_up"])
            h = h + F.linear(gu[:, :INTER] * gu[:, INTER:], lw["down"])
        return F.linear(h, head)

    floor = 1e6 * nbytes / bw
    rows = []
    for name, fn, kernels in (("ours (4 matmuls a layer)", ours, 4 * LAYERS + 1),
                              ("cublas F.linear (+ mul, add)", cublas, 6 * LAYERS + 1)):
        for on in ((False, True) if fn is ours else (True,)):
            set_pdl(on)
            t = graph_us(fn)
            rows.append({"variant": f"kotodama matmul chain {name} pdl={int(pdl.enabled(x.device))}",
                         "kernels": kernels, "us": t, "floor_us": floor, "ratio_to_floor": t / floor,
                         "weights_bytes": nbytes})
            print(f"{rows[-1]['variant']:60} {t:7.1f} us  floor {floor:5.1f} us  x{t / floor:.1f}", flush=True)
    set_pdl(True)
    return rows


def main():
    bw = copy_bandwidth()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "copy_bandwidth_Bps": bw, "rows": empty_chain(256) + kotodama_chain(bw)}
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    (out_dir / "launch_chain.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
