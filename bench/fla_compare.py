"""Our chunked monoid prefill (kernels/monoid_triton.varlen_prefill) against flash-linear-attention's
`chunk_gla` (fla-core), the same recurrence (GLA with a per-key-dim decay, inclusive readout), on the
Spartacus-1.4B layer shape (32 heads × 64), bf16 q/k/v, fp32 log-decays and states, from a nonzero
initial state, single sequences and a packed varlen batch. Both are checked against a float64 token loop
on the short case and against each other on all; then timed (CUDA events, median).

The issue allows fla-core for chunked prefill where a measured comparison shows it wins; decode stays ours.
Usage (GPU machine, fla-core wheel installed): python bench/fla_compare.py → $OUT/fla_compare.json.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from hybridserve.kernels import monoid, monoid_triton

H, D = 32, 64


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median") * 1e3


def main():
    from fla.ops.gla import chunk_gla
    import fla
    torch.manual_seed(0)
    rows = []
    for lens in ([512], [2048], [4096], [8192], [1024, 3072, 512, 2560]):
        T, N = sum(lens), len(lens)
        q = (torch.randn(T, H, D, device="cuda") * D ** -0.5).bfloat16()
        k = F.silu(torch.randn(T, H, D, device="cuda")).bfloat16()
        v = torch.randn(T, H, D, device="cuda").bfloat16()
        g = F.logsigmoid(torch.randn(T, H, D, device="cuda") * 2 + 3)
        h0 = torch.randn(N, H, D, D, device="cuda") * 0.1
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device="cuda")
        pool = torch.zeros(N + 1, H, D, D, device="cuda")
        slots = torch.arange(1, N + 1, device="cuda")

        def ours():
            pool[1:] = h0
            return monoid_triton.varlen_prefill(q, k, v, g, cu.to(torch.int32), pool, slots), pool[1:]

        def theirs():
            o, ht = chunk_gla(q[None], k[None], v[None], g[None], scale=1.0, initial_state=h0,
                              output_final_state=True, cu_seqlens=cu)
            return o[0], ht
        o1, s1 = ours()
        o1, s1 = o1.clone(), s1.clone()
        o2, s2 = theirs()
        row = {"lens": lens, "tokens": T, "rel_o_ours_vs_fla": rel(o1, o2), "rel_state_ours_vs_fla": rel(s1, s2)}
        if T <= 512:       # float64 loop from the same initial state
            o_ref, s_ref = monoid.naive(q.double(), k.double(), v.double(), g.double(), h0[0].double())
            row["rel_o_ours_vs_fp64"], row["rel_o_fla_vs_fp64"] = rel(o1, o_ref), rel(o2, o_ref)
            row["rel_state_ours_vs_fp64"], row["rel_state_fla_vs_fp64"] = rel(s1[0], s_ref), rel(s2[0], s_ref)
        pool_copy = torch.empty_like(h0)
        row["us_ours"] = us(ours) - us(lambda: pool_copy.copy_(h0))     # minus the state reset it includes
        row["us_fla"] = us(theirs)
        row["fla_over_ours"] = row["us_fla"] / row["us_ours"]
        rows.append(row)
        print(f"{str(lens):28} ours {row['us_ours']:8.1f} us  fla {row['us_fla']:8.1f} us  "
              f"fla/ours {row['fla_over_ours']:.2f}  o diff {row['rel_o_ours_vs_fla']:.1e}  "
              f"state diff {row['rel_state_ours_vs_fla']:.1e}"
              + (f"  vs fp64: ours {row['rel_o_ours_vs_fp64']:.1e} fla {row['rel_o_fla_vs_fp64']:.1e}"
                 if "rel_o_ours_vs_fp64" in row else ""), flush=True)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "fla_core": getattr(fla, "__version__", "?"), "heads": H, "head_dim": D, "rows": rows}
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    (out_dir / "fla_compare.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
