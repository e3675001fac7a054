"""The matmul chain of a batch-1 decode step, alone: Spartacus-1.4B's 16 layers × (qkvz, o, gate_up+SiLU·mul,
down) + the 128k-vocabulary head, 2.7 GB of bf16 weights, replayed as one CUDA graph. It isolates what the
GEMV kernel and programmatic dependent launch (kernels/pdl.py) do to the bandwidth a chain of dependent
matmuls reaches, against the copy bandwidth measured in the same run and against cuBLAS (F.linear).

Usage (GPU machine): python bench/gemv_chain.py [--chain-only] [--stream [--step-archs=spartacus,...]]
→ $OUT/gemv_chain.json (or bench/results/). --stream: also the streamed GEMV (sweep, chain, whole steps).
--maxnreg-ab=spartacus,...: only whole steps, the streamed GEMV with and without a 64-register cap, round-robin
→ $OUT/gemv_stream_maxnreg.json.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from hybridserve.kernels import fused_triton as ft
from hybridserve.kernels import pdl

HIDDEN, INTER, LAYERS, VOCAB = 2048, 8192, 16, 128256


def copy_bandwidth() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(20):
        b.copy_(a)
    e.record()
    e.synchronize()
    return 2 * a.numel() * 20 / (s.elapsed_time(e) / 1e3)


def weights():
    g = torch.Generator(device="cuda").manual_seed(0)

    def w(n, k):
        return (torch.randn(n, k, device="cuda", generator=g) * k ** -0.5).to(torch.bfloat16)
    layers = [dict(qkvz=w(4 * HIDDEN, HIDDEN), o=w(HIDDEN, HIDDEN), gate_up=w(2 * INTER, HIDDEN),
                   down=w(HIDDEN, INTER), n1=torch.rand(HIDDEN, device="cuda").to(torch.bfloat16) + 0.5,
                   n2=torch.rand(HIDDEN, device="cuda").to(torch.bfloat16) + 0.5) for _ in range(LAYERS)]
    return layers, w(VOCAB, HIDDEN)


def chain_triton(layers, head, h):
    delta = None
    for lw in layers:
        h, qkvz = ft.add_norm_linear(h, delta, lw["n1"], lw["qkvz"], 1e-5)
        o = qkvz[:, 2 * HIDDEN:3 * HIDDEN]          # stands in for the recurrence's output
        h, g = ft.add_norm_linear_silu_mul(h, ft.linear(o, lw["o"]), lw["n2"], lw["gate_up"], 1e-5)
        delta = ft.linear(g, lw["down"])
    return ft.add_norm_linear(h, delta, layers[0]["n1"], head, 1e-5, out_dtype=torch.float32)[1]


def chain_cublas(layers, head, h):
    for lw in layers:
        qkvz = F.linear(h, lw["qkvz"])
        gu = F.linear(F.linear(qkvz[:, 2 * HIDDEN:3 * HIDDEN], lw["o"]), lw["gate_up"])
        h = h + F.linear(gu[:, :INTER] * gu[:, INTER:], lw["down"])
    return F.linear(h, head)


def graph_us(fn, replays=30) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    times.sort()
    return times[len(times) // 2]


def set_pdl(on: bool):
    os.environ["HYBRIDSERVE_PDL"] = "1" if on else "0"
    pdl._supported.cache_clear()


SHAPES = [  # name, N, K, SiLU·mul (the weight stacks 2N rows), norm + residual add of the input, rows
    ("qkvz", 4 * HIDDEN, HIDDEN, False, True, 1), ("o", HIDDEN, HIDDEN, False, False, 1),
    ("gate_up", INTER, HIDDEN, True, True, 1), ("down", HIDDEN, INTER, False, False, 1),
    ("head", VOCAB, HIDDEN, False, True, 1), ("qkvz-2rows", 4 * HIDDEN, HIDDEN, False, True, 2),
    ("down-2rows", HIDDEN, INTER, False, False, 2)]
CONFIGS = [(bn, bk, w) for bn in (1, 2, 4, 8) for bk in (512, 1024, 2048) for w in (4, 8)
           if bn * bk <= 16384 and bn * bk >= 1024]


@contextmanager
def knobs(**values):
    """fused_triton settings (GEMV_STREAM, gemv_config, …) for the duration, restored after."""
    before = {k: getattr(ft, k) for k in values}
    for k, v in values.items():
        setattr(ft, k, v)
    try:
        yield
    finally:
        for k, v in before.items():
            setattr(ft, k, v)


class ShapeCase:
    """One matmul shape alone, repeated in one graph over enough weight copies to miss L2 (>= 256 MB)."""

    def __init__(self, N, K, silu, norm, M):
        self.silu, self.norm = silu, norm
        self.rows_n = 2 * N if silu else N
        self.nbytes = self.rows_n * K * 2
        copies = max(1, -(-(256 << 20) // self.nbytes))
        self.ws = [torch.randn(self.rows_n, K, device="cuda").to(torch.bfloat16) * K ** -0.5 for _ in range(copies)]
        self.xk = torch.randn(M, K, device="cuda").to(torch.bfloat16)
        self.nw = torch.rand(K, device="cuda").to(torch.bfloat16) + 0.5
        self.reps = max(copies, 16)
        self.want = self.call(0).float()

    def call(self, i):
        """The i-th weight copy's matmul, as the model calls it (residual add + norm, SiLU·mul)."""
        w = self.ws[i % len(self.ws)]
        if self.silu:
            return ft.add_norm_linear_silu_mul(self.xk, self.xk, self.nw, w, 1e-5)[1]
        if self.norm:
            return ft.add_norm_linear(self.xk, self.xk, self.nw, w, 1e-5)[1]
        return ft.linear(self.xk, w)

    def cublas(self, i):
        return F.linear(self.xk, self.ws[i % len(self.ws)])

    def us(self, fn=None) -> float:
        """µs per call of fn (default: call) over `reps` calls in one graph."""
        fn = fn or self.call
        return graph_us(lambda: [fn(i) for i in range(self.reps)]) / self.reps

    def row(self, name, config, bw, **setting) -> dict:
        """Checked against the case's first result, then timed, with the fused_triton settings given."""
        with knobs(**setting):
            err = ((self.call(0).float() - self.want).norm() / self.want.norm()).item()
            assert err < 2e-2, (name, config, err)
            t = self.us()
        return {"shape": name, "N": self.rows_n, "K": self.xk.shape[1], "M": self.xk.shape[0], "config": str(config),
                "us": t, "TBps": self.nbytes / t / 1e6, "of_copy_bw": self.nbytes / t / 1e6 / (bw / 1e12)}


def fixed(config):
    return lambda *shape: config


def shape_sweep(bw):
    """The plain GEMV per shape and tile config, against its default rule and cuBLAS."""
    rows, best = [], {}
    for name, N, K, silu, norm, M in SHAPES:
        case = ShapeCase(N, K, silu, norm, M)
        for cfg in CONFIGS + ["default"]:
            rows.append(case.row(name, cfg, bw, GEMV_STREAM=False,
                                 gemv_config=DEFAULT_CONFIG if cfg == "default" else fixed(cfg)))
            if isinstance(cfg, tuple) and (name not in best or rows[-1]["us"] < best[name][1]):
                best[name] = (cfg, rows[-1]["us"])
        t = case.us(case.cublas)
        rows.append({"shape": name, "M": M, "N": case.rows_n, "K": K, "config": "cublas", "us": t,
                     "TBps": case.nbytes / t / 1e6, "of_copy_bw": case.nbytes / t / 1e6 / (bw / 1e12)})
        d = next(r for r in rows if r["shape"] == name and r["config"] == "default")
        print(f"{name:8} {case.rows_n:6}x{K:5}: default {d['us']:6.1f} us {d['TBps']:.2f} TB/s | best "
              f"{best[name][0]} {best[name][1]:6.1f} us {case.nbytes / best[name][1] / 1e6:.2f} TB/s | cublas "
              f"{t:6.1f} us {case.nbytes / t / 1e6:.2f} TB/s", flush=True)
        del case
    return rows, {k: v[0] for k, v in best.items()}


DEFAULT_CONFIG = ft.gemv_config
DEFAULT_STREAM = ft.gemv_stream_config

# the streamed GEMV (ft.GEMV_STREAM): tiles × programs per SM, on Spartacus's and Kotodama-3B's one-row shapes
STREAM_SHAPES = [s for s in SHAPES if s[5] == 1] + [
    ("k3b-qkv", 5120, 3072, False, True, 1), ("k3b-o", 3072, 3072, False, False, 1),
    ("k3b-gate_up", 8192, 3072, True, True, 1), ("k3b-down", 3072, 8192, False, False, 1),
    ("k3b-head", 49152, 3072, False, True, 1)]
STREAM_CONFIGS = [(bn, 2048, 8, pps, False) for bn in (2, 4, 8) for pps in (2, 4, 6, 8)]


def stream_sweep(bw):
    """Each one-row shape with the streamed GEMV per config (same protocol as shape_sweep), against the
    plain GEMV of the same shape in the same run."""
    rows, best = [], {}
    for name, N, K, silu, norm, M in STREAM_SHAPES:
        case = ShapeCase(N, K, silu, norm, M)
        rows.append(case.row(name, "gemv default", bw, GEMV_STREAM=False))
        base = rows[-1]["us"]
        for cfg in STREAM_CONFIGS + ["stream default"]:
            rows.append(case.row(name, cfg, bw, GEMV_STREAM=True,
                                 gemv_stream_config=DEFAULT_STREAM if cfg == "stream default" else fixed(cfg)))
            if isinstance(cfg, tuple) and (name not in best or rows[-1]["us"] < best[name][1]):
                best[name] = (cfg, rows[-1]["us"])
        print(f"stream {name:11} {case.rows_n:6}x{K:5}: gemv {base:6.1f} us {case.nbytes / base / 1e6:.2f} TB/s | "
              f"best {best[name][0]} {best[name][1]:6.1f} us {case.nbytes / best[name][1] / 1e6:.2f} TB/s",
              flush=True)
        del case
    return rows, {(N, K, 2 if silu else 1): best[name][0] for name, N, K, silu, _, _ in STREAM_SHAPES}


def main():
    import sys
    bw = copy_bandwidth()
    set_pdl(True)
    ab_archs = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--maxnreg-ab=")), "")
    if ab_archs:     # whole steps only: the streamed GEMV at the compiler's register count vs capped at 64
        out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bandwidth_Bps": bw,
               "step": knob_ab(ab_archs.split(","), {"stream": {}, "stream_maxnreg64": {"GEMV_STREAM_MAXNREG": 64}},
                               bw, rounds=3)}
        out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
        (out_dir / "gemv_stream_maxnreg.json").write_text(json.dumps(out, indent=1))
        return
    sweep, best = shape_sweep(bw) if "--chain-only" not in sys.argv else ([], {})
    layers, head = weights()
    nbytes = sum(t.numel() * 2 for lw in layers for t in lw.values()) + head.numel() * 2
    x = torch.randn(1, HIDDEN, device="cuda").to(torch.bfloat16)
    ref = chain_triton(layers, head, x)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bandwidth_Bps": bw,
           "weights_bytes": nbytes, "floor_us": 1e6 * nbytes / bw, "shape_sweep": sweep,
           "best": {k: list(v) for k, v in best.items()}, "rows": []}
    print(f"copy {bw / 1e12:.2f} TB/s; chain {nbytes / 1e9:.2f} GB; floor {out['floor_us']:.0f} us", flush=True)
    t = graph_us(lambda: chain_cublas(layers, head, x))
    out["rows"].append({"variant": "cublas F.linear chain (no glue)", "us": t, "TBps": nbytes / t / 1e6})
    print(f"{'cublas':34} {t:8.1f} us  {nbytes / t / 1e6:5.2f} TB/s", flush=True)
    by_shape = {(N, K, 2 if silu else 1): best[name] for name, N, K, silu, _, M in SHAPES if name in best}

    def tuned(M, N, K, stacked=1):
        return by_shape.get((N, K, stacked)) or DEFAULT_CONFIG(M, N, K, stacked)
    def chain_row(name, **setting):
        with knobs(**setting):
            y = chain_triton(layers, head, x)
            err = ((y - ref).norm() / ref.norm()).item()
            t = graph_us(lambda: chain_triton(layers, head, x))
        out["rows"].append({"variant": name, "us": t, "TBps": nbytes / t / 1e6, "ratio_to_floor":
                            t / out["floor_us"], "rel_err_vs_default": err})
        print(f"{name:34} {t:8.1f} us  {nbytes / t / 1e6:5.2f} TB/s  x{t / out['floor_us']:.2f} floor  "
              f"err {err:.1e}", flush=True)
    for label, cfg_fn in (("default", DEFAULT_CONFIG), ("best-per-shape", tuned))[:2 if best else 1]:
        for on in (False, True):
            set_pdl(on)
            chain_row(f"triton {label} pdl={int(pdl.enabled(x.device))}", GEMV_STREAM=False, gemv_config=cfg_fn)
    set_pdl(True)
    archs = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--step-archs=")), "")
    if "--steps-only" in sys.argv:          # the whole-step A/B with the stream's own rule, nothing else
        out["step"] = step_ab(archs.split(","), DEFAULT_STREAM, bw)
        archs = ""
    elif "--stream" in sys.argv:
        out["stream_sweep"], stream_best = stream_sweep(bw)
        out["stream_best"] = [[*k, *v] for k, v in stream_best.items()]

        def stream_tuned(N, K, stacked=1, after_block=False):
            return stream_best.get((N, K, stacked)) or DEFAULT_STREAM(N, K, stacked, after_block)
        for label, fn in (("stream default", DEFAULT_STREAM), ("stream best-per-shape", stream_tuned)):
            chain_row(f"triton {label} pdl=1", GEMV_STREAM=True, gemv_stream_config=fn)
        if archs:
            out["step"] = step_ab(archs.split(","), stream_tuned, bw)
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    (out_dir / "gemv_chain.json").write_text(json.dumps(out, indent=1))


def step_ab(archs, stream_config, bw):
    """Whole batch-1 decode steps (bench/decode_latency.py's graph) with the default GEMV, then streamed."""
    import decode_latency as dl
    rows = []
    for arch in archs:
        model = dl.load_full(arch)
        s = dl.Setup(model, 1, 128)
        row = {"arch": arch, "floor_ms": dl.floor_ms(model, s, bw)}
        for label, on in (("gemv", False), ("stream", True), ("gemv_again", False), ("stream_again", True)):
            with knobs(GEMV_STREAM=on, gemv_stream_config=stream_config):
                row[f"ms_{label}"] = dl.graph_ms(model, s, 1)
        print(f"step {arch:12} floor {row['floor_ms']:.3f} ms | gemv {row['ms_gemv']:.3f} stream "
              f"{row['ms_stream']:.3f} gemv again {row['ms_gemv_again']:.3f} stream again "
              f"{row['ms_stream_again']:.3f}", flush=True)
        rows.append(row)
        del model, s
        torch.cuda.empty_cache()
    return rows


def knob_ab(archs, settings: dict, bw, rounds: int = 2):
    """Whole batch-1 decode steps (bench/decode_latency.py's graph) under each fused_triton setting in turn,
    `rounds` times round-robin (A/B/A/B…), so drift between runs shows."""
    import decode_latency as dl
    rows = []
    for arch in archs:
        model = dl.load_full(arch)
        s = dl.Setup(model, 1, 128)
        row = {"arch": arch, "floor_ms": dl.floor_ms(model, s, bw)}
        for r in range(rounds):
            for label, setting in settings.items():
                with knobs(**setting):
                    row.setdefault(f"ms_{label}", []).append(dl.graph_ms(model, s, 1))
        print(f"step {arch:12} floor {row['floor_ms']:.3f} ms | " + " | ".join(
            f"{label} " + " ".join(f"{t:.3f}" for t in row[f"ms_{label}"]) for label in settings), flush=True)
        rows.append(row)
        del model, s
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    main()
