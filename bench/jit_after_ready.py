"""Kernel variants first met after the engine turned ready. Each is a Triton compile inside somebody's request:
0.1-1 s apiece on a machine with an empty Triton cache (a fresh container), and a burst of them stalls every
stream for seconds. Compared in the same run: the start-up warm-up `basic` (one 1-token generation) against
`shapes` (engine/warmup.py), and what each costs at start.

Per (arch, warm-up), one fresh process with an empty Triton cache (TRITON_CACHE_DIR): a synthetic full-size
checkpoint (bf16) served by the AsyncEngine as `hybridserve serve` builds it (CUDA graphs, async scheduling,
max_num_seqs 64, context 4096), every Triton compile recorded with its phase (kernels/jit_watch.py): the
engine's build (graph captures), the warm-up, then tests/varied_workload.py through `AsyncEngine.generate`:
  lengths    one prompt at a time, 1 to 3000 tokens (chunked above the step budget; up to the context);
  bursts     C prompts at once, C = 2..64, random lengths up to 300; 5 and 16 prompts within one KV page;
             3 prompts of 16 pages;
  staggered  40 requests arriving 0-20 ms apart, random lengths up to 800 and lengths of output, random
             sampling (greedy, temperature/top_p, top_k/min_p, seeded, penalties, logprobs, stop strings);
  served     8 then 32 prompts of 128 tokens at once (bench/serve_latency.py's rounds), greedy then sampled.
Every request must end with its tokens and the pools must be empty after each phase.

Usage (GPU machine): python bench/jit_after_ready.py --tokenizer DIR [--archs ...] [--warmups basic,shapes]
→ $OUT/jit_after_ready.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import varied_workload  # noqa: E402


def child(arch: str, warmup: str, tokenizer: str) -> dict:
    from decode_latency import load_full
    from engine_decode import new_engine
    from hybridserve.engine.async_engine import AsyncEngine
    from hybridserve.kernels.jit_watch import JitWatch
    from hybridserve.weights.tokenizer import Tokenizer

    watch = JitWatch().start()
    t0 = time.perf_counter()
    model = load_full(arch)
    tok = Tokenizer.from_hf_dir(tokenizer)
    t_load, at_load = time.perf_counter(), len(watch.compiles)
    # 2 GiB of cache each: ten of these processes share one GPU
    eng = new_engine(model, tok, budget=2 << 30, max_num_seqs=64, warmup=warmup)
    t_build, at_build = time.perf_counter(), len(watch.compiles)
    row = {"arch": arch, "warmup": warmup, "load_s": t_load - t0, "build_s": t_build - t_load}
    phases = []

    async def run() -> int:
        ae = AsyncEngine(eng, arch)
        await ae.start()
        row["warmup_s"] = time.perf_counter() - t_build
        at_ready = len(watch.compiles)
        since = {"t": time.perf_counter(), "mark": at_ready}

        def phase_done(name: str) -> None:
            new = watch.since(since["mark"])
            wall = time.perf_counter() - since["t"]
            phases.append({"phase": name, "wall_s": wall, "compiles": len(new),
                           "compile_s": sum(c.seconds for c in new),
                           "variants": [[c.kernel, round(c.seconds, 3), c.variant] for c in new]})
            print(f"{arch:10} {warmup:6} {name:16} {len(new):3} compiles {sum(c.seconds for c in new):6.2f} s  "
                  f"wall {wall:6.2f} s", flush=True)
            since["t"], since["mark"] = time.perf_counter(), len(watch.compiles)

        await varied_workload.run(ae, phase_done=phase_done)
        row["after_ready_compiles"] = len(watch.compiles) - at_ready
        row["after_ready_jit_counter"] = ae.jit_compiles_after_ready
        await ae.shutdown()
        return at_ready

    at_ready = asyncio.run(run())
    watch.stop()
    build, warm = watch.compiles[at_load:at_build], watch.compiles[at_build:at_ready]
    return {**row, "build_compiles": len(build), "build_compile_s": sum(c.seconds for c in build),
            "warmup_compiles": len(warm), "warmup_compile_s": sum(c.seconds for c in warm),
            "warmup_variants": [[c.kernel, round(c.seconds, 3)] for c in warm], "phases": phases}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=os.environ.get("HYBRIDSERVE_TOKENIZER_DIR"))
    ap.add_argument("--archs", default="spartacus,nanohammer,neollm,kotodama,llama")
    ap.add_argument("--warmups", default="basic,shapes")
    ap.add_argument("--parallel", type=int, default=10)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        arch, warmup, path = args.child.split(",")
        Path(path).write_text(json.dumps(child(arch, warmup, args.tokenizer)))
        return
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    jobs = [(a, w) for a in args.archs.split(",") for w in args.warmups.split(",")]
    results, running = [], []
    with tempfile.TemporaryDirectory() as tmp:
        def launch(a, w):
            cache = Path(tmp) / f"triton-{a}-{w}"
            cache.mkdir()
            res = Path(tmp) / f"{a}-{w}.json"
            env = {**os.environ, "TRITON_CACHE_DIR": str(cache)}
            proc = subprocess.Popen([sys.executable, __file__, "--tokenizer", args.tokenizer,
                                     "--child", f"{a},{w},{res}"], env=env)
            return proc, res, a, w

        pending = list(jobs)
        while pending or running:
            while pending and len(running) < args.parallel:
                running.append(launch(*pending.pop(0)))
            time.sleep(1)
            for item in list(running):
                proc, res, a, w = item
                if proc.poll() is not None:
                    running.remove(item)
                    results.append(json.loads(res.read_text()) if proc.returncode == 0 and res.exists()
                                   else {"arch": a, "warmup": w, "error": f"exit {proc.returncode}"})
                    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": results}
                    (out_dir / "jit_after_ready.json").write_text(json.dumps(out, indent=1))
    for r in results:
        if "error" in r:
            print(r)
            continue
        print(f"{r['arch']:10} {r['warmup']:6} build {r['build_s']:6.1f} s ({r['build_compiles']} compiles)  "
              f"warm-up {r['warmup_s']:6.2f} s ({r['warmup_compiles']})  after ready "
              f"{r['after_ready_compiles']} compiles, {sum(p['compile_s'] for p in r['phases']):.2f} s")


if __name__ == "__main__":
    main()
