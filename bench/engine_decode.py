"""Per-token decode latency through the whole engine step (scheduler → batch metadata → CUDA-graph replay →
sampler → detokenizer), against the decode graph replayed back to back in the same run: what a client sees per
token beyond the kernels, with async scheduling (engine/inflight.py: the next step launched before the host
reads this one's tokens) off and on.

Synthetic full-size checkpoints (weights/synth.py, bf16) with the SmolLM2 tokenizer read from a directory
(`--tokenizer`, e.g. one weights/synth.py `_write_tokenizer` wrote). Each row: B requests of a 64-token
prompt, greedy or sampled (temperature 0.8, top_p 0.95; MODES), ignore_eos, timed over the decode steps after the
prefill. Per step: wall time of `LLMEngine.step`, the GPU time of the forward it launched (CUDA events around
the runner: includes the input copies), the host time until that launch returned (schedule + inputs + launch)
and the time after it (sampling, which ends in the one device→host read, then append, detokenize, finish
checks; with async scheduling the read is the previous step's). The baseline: the same decode graph replayed
back to back (no host work in between); overhead = step − replay. `--gc plain,frozen` runs rows in turn with
the heap as built or frozen (engine/gc_pauses.py), with each row's garbage collections.

Usage (GPU machine): python bench/engine_decode.py --tokenizer DIR [--archs ...] → $OUT/engine_decode.json
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import itertools
import json
import os
import pstats
import statistics
import time
from pathlib import Path

import torch

from decode_latency import load_full, measure_copy_bandwidth, time_fn
from hybridserve.engine.cache_pools import CachePools, plan_memory
from hybridserve.engine.config import EngineConfig
from hybridserve.engine.gc_pauses import GcWatch, freeze_heap
from hybridserve.engine import detokenizer, model_runner, sampler_graphs
from hybridserve.engine.llm_engine import LLMEngine
from hybridserve.engine.request import SamplingParams
from hybridserve.kernels import sampling, sampling_triton
from hybridserve.weights.safetensors_dir import read_sidecars

MODES = {"greedy": dict(temperature=0.0), "sampled": dict(temperature=0.8, top_p=0.95),
         "sampled_top_k": dict(temperature=0.8, top_k=50, top_p=0.95),
         # as "sampled", with the sampler graphs cutting top_p by the sorted reference (kernels/sampling.py)
         "sampled_sort": dict(temperature=0.8, top_p=0.95)}


class StepClock:
    """Wraps an engine's runner to time the parts of each step."""

    def __init__(self, eng: LLMEngine):
        self.eng, self.rows, self.events = eng, [], []
        # the engine's own step where its outputs leave it (the column form an engine process sends), else step()
        self._step = getattr(eng, "step_rows", eng.step)

        def timed(run):
            def timed_run(*a, **k):
                if self.launched is not None:      # run_next falling back to run: time the outer call
                    return run(*a, **k)
                ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                ev0.record()
                self.launched = (ev0, ev1)
                out = run(*a, **k)
                ev1.record()
                self.t_run = time.perf_counter()
                return out
            return timed_run
        eng.runner.run = timed(eng.runner.run)
        if hasattr(eng.runner, "run_next"):        # the async step's launch, where the runner has it
            eng.runner.run_next = timed(eng.runner.run_next)

    def step(self, record: bool) -> None:
        self.t_run = self.launched = None
        t0 = time.perf_counter()
        self._step()
        t1 = time.perf_counter()
        if record and self.t_run is not None:
            self.rows.append({"step": t1 - t0, "host_to_launch": self.t_run - t0, "after_launch": t1 - self.t_run})
            self.events.append(self.launched)

    def summary(self) -> dict:
        torch.cuda.synchronize()        # with async scheduling the last launch is still running at step's end
        for row, (ev0, ev1) in zip(self.rows, self.events):
            row["forward_gpu"] = ev0.elapsed_time(ev1) / 1e3
        return {k + "_ms": 1e3 * statistics.median(r[k] for r in self.rows) for k in self.rows[0]}


def new_engine(model, tokenizer, budget: int = 4 << 30, **config) -> LLMEngine:
    """An engine over `model` with a `budget`-byte cache and a context of at most 4096 (EngineConfig fields)."""
    cfg = EngineConfig(max_model_len=min(4096, model.max_model_len), **config)
    layout = model.cache_layout()
    plan = plan_memory(layout, model.dtype, budget, cfg.page_size, cfg.max_num_seqs, cfg.max_model_len)
    pools = CachePools(layout, plan, cfg.page_size, model.dtype, model.device)
    return LLMEngine(model, tokenizer, pools, cfg, cfg.max_model_len)


def run_row(model, tokenizer, batch: int, mode: str, new_tokens: int, max_num_seqs: int, async_on: bool,
            profile_host: bool = False, freeze: bool = False, detokenize: bool = True) -> dict:
    t = time.perf_counter()
    search = sampling_triton.truncation_floor
    if mode.endswith("_sort"):          # captured into the sampler graphs at engine start
        sampling_triton.truncation_floor = sampling.truncation_floor
    try:
        eng = new_engine(model, tokenizer, max_num_seqs=max_num_seqs, async_scheduling=async_on)
    finally:
        sampling_triton.truncation_floor = search
    eng.detokenize = detokenize
    pools = eng.pools
    setup_s = time.perf_counter() - t
    clock = StepClock(eng)
    if freeze:                  # as the server does once warm (engine/gc_pauses.py); undone after the row
        freeze_heap()
    gc_watch = GcWatch()
    g = torch.Generator().manual_seed(batch)
    for b in range(batch):
        prompt = torch.randint(100, 40000, (64,), generator=g).tolist()
        eng.add_request(f"r{b}", prompt, SamplingParams(max_tokens=new_tokens, ignore_eos=True, **MODES[mode]))
    clock.step(record=False)                               # the prefill
    n = 0
    prof = cProfile.Profile() if profile_host else None
    while eng.has_work():
        if prof is not None and n == 8:
            prof.enable()
        clock.step(record=n >= 8)                          # the first decode steps warm up clocks and caches
        n += 1
    gc_seen = gc_watch.summary()
    gc_watch.close()
    row = {"batch": batch, "mode": mode, "async_scheduling": async_on, "decode_steps": n,
           "async_steps": eng.num_async_steps, "engine_setup_s": setup_s, "gc_frozen": gc_seen.frozen,
           "gc_collections": list(gc_seen.collections), "gc_ms": 1e3 * sum(gc_seen.seconds), **clock.summary()}
    if prof is not None:        # host functions by own time per step (the profiler slows the host part)
        prof.disable()
        stats = pstats.Stats(prof).stats
        per = max(1, n - 8)
        top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:30]
        row["host_profile"] = [{"function": f"{Path(f).name}:{line}:{name}", "calls_per_step": nc / per,
                                "own_us_per_step": 1e6 * tt / per, "cum_us_per_step": 1e6 * ct / per}
                               for (f, line, name), (_, nc, tt, ct, _) in top]
    assert pools.pages.num_used == 0 and (not pools.layout.states or pools.slots.num_used == 0)
    graph = eng.runner.graphs.graphs[eng.runner.graphs.padded_size(batch)]   # its inputs: the last step's
    row["graph_replay_ms"] = time_fn(graph.replay, iters=100, warmup=20)
    row["overhead_ms"] = row["step_ms"] - row["graph_replay_ms"]
    row["step_over_replay"] = row["step_ms"] / row["graph_replay_ms"]
    row["tok_per_s"] = 1e3 * batch / row["step_ms"]
    eng.runner.run = eng.runner.run_next = None             # the clock's wrappers hold the engine
    del eng, pools, clock, graph
    gc.unfreeze()
    gc.collect()
    torch.cuda.empty_cache()
    return row


def run_mixed(model, tokenizer, batch: int, prompt_len: int, arrivals: int, split: bool) -> dict:
    """The step that admits a request while `batch` others decode (its prompt beside their decode rows): wall
    time of that engine step, with the mixed step as two graph replays (`split`) or one eager forward."""
    model_runner.MIXED_GRAPHS = split
    eng = new_engine(model, tokenizer, max_num_seqs=batch + 1, max_num_batched_tokens=2048)
    run, mixed = eng.runner.run, []

    def noting_mixed(chunks, *a, **k):      # a step of several chunks, one of them a prompt's
        mixed.append(len(chunks) > 1 and any(len(c.tokens) > 1 for c in chunks))
        return run(chunks, *a, **k)
    eng.runner.run = noting_mixed
    g = torch.Generator().manual_seed(batch)
    for b in range(batch):
        prompt = torch.randint(100, 40000, (64,), generator=g).tolist()
        eng.add_request(f"r{b}", prompt, SamplingParams(max_tokens=eng.max_model_len - 64, ignore_eos=True,
                                                           temperature=0.0))
    for _ in range(8):
        eng.step()
    times = []
    for k in range(arrivals):
        prompt = torch.randint(100, 40000, (prompt_len,), generator=g).tolist()
        eng.add_request(f"new{k}", prompt, SamplingParams(max_tokens=1, temperature=0.0))
        for _ in range(6):       # drain the in-flight step, the mixed step, back to decoding
            mixed.clear()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            eng.step()
            torch.cuda.synchronize()
            if any(mixed):
                times.append(time.perf_counter() - t0)
    for b in range(batch):
        eng.abort(f"r{b}")
    while eng.has_work():
        eng.step()
    model_runner.MIXED_GRAPHS = True
    eng.runner.run = None
    del eng
    gc.collect()
    torch.cuda.empty_cache()
    return {"batch": batch, "prompt_len": prompt_len, "mixed_as_graphs": split, "mixed_steps": len(times),
            "mixed_step_ms": 1e3 * statistics.median(times[2:] or times)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True, help="a directory with tokenizer.json (+ its config)")
    ap.add_argument("--archs", default="spartacus,kotodama")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--modes", default="greedy,sampled")
    ap.add_argument("--tokens", type=int, default=72)
    ap.add_argument("--async", dest="async_modes", default="off,on", help="async scheduling: off, on or both")
    ap.add_argument("--detok", default="stream", help="incremental detokenizer, comma list: stream (tokenizers' "
                    "DecodeStream where available), window (engine/detokenizer.py's own code), none (the engine "
                    "hands out tokens only, as behind a server: LLMEngine.detokenize = False)")
    ap.add_argument("--gc", default="plain", help="the heap during the steps, comma list: plain, frozen (gc.freeze "
                    "after the engine is built, as the server does once warm); rows in turn")
    ap.add_argument("--profile-host", action="store_true", help="cProfile the decode steps' host code")
    ap.add_argument("--sampler-max-batch", default="", help="comma list of engine/sampler_graphs.py MAX_BATCH "
                    "values, each a row (the largest batch sampled by graphs; larger ones sample eagerly)")
    ap.add_argument("--mixed", default="", help="instead: the step admitting a prompt of N tokens (comma-"
                    "separated N) while the batches decode, as two graphs and eagerly")
    args = ap.parse_args()
    tokenizer, _ = read_sidecars(Path(args.tokenizer))
    batches = [int(b) for b in args.batches.split(",")]
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "copy_bandwidth_Bps": measure_copy_bandwidth(), "rows": []}
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    for arch in args.archs.split(","):
        model = load_full(arch)
        if args.mixed:
            for B, n, split in itertools.product(batches, map(int, args.mixed.split(",")), (False, True)):
                if n + 1 > min(4096, model.max_model_len):
                    continue
                row = {"arch": arch, **run_mixed(model, tokenizer, B, n, 12, split)}
                out["rows"].append(row)
                print(f"{arch:11} B={B:3} prompt {n:5}  mixed step as {'graphs' if split else 'eager '} "
                      f"{row['mixed_step_ms']:7.3f} ms ({row['mixed_steps']} steps)", flush=True)
                (out_dir / "engine_mixed.json").write_text(json.dumps(out, indent=1))
            del model
            torch.cuda.empty_cache()
            continue
        caps = [int(c) for c in args.sampler_max_batch.split(",") if c] or [sampler_graphs.MAX_BATCH]
        for mode, B, am, dt, cap, heap in itertools.product(args.modes.split(","), batches,
                                                            args.async_modes.split(","), args.detok.split(","), caps,
                                                            args.gc.split(",")):
            detokenizer.STREAM = dt == "stream"
            sampler_graphs.MAX_BATCH = cap
            row = {"arch": arch, "detok": dt, "sampler_max_batch": cap, "heap": heap,
                   **run_row(model, tokenizer, B, mode, args.tokens, max(batches), am == "on", args.profile_host,
                             heap == "frozen", dt != "none")}
            out["rows"].append(row)
            print(f"{arch:11} {mode:7} B={B:3} async {am:3} detok {dt:6} samplers<={cap:3} heap {heap:6} "
                  f"(gc {row['gc_collections']} {row['gc_ms']:.1f} ms)  step "
                  f"{row['step_ms']:6.3f} ms  graph replay {row['graph_replay_ms']:6.3f}  overhead "
                  f"{row['overhead_ms']:6.3f} (to launch {row['host_to_launch_ms']:.3f}, after "
                  f"{row['after_launch_ms']:.3f}; forward GPU {row['forward_gpu_ms']:.3f})  "
                  f"{row['tok_per_s']:8.0f} tok/s", flush=True)
            for f in row.get("host_profile", [])[:15]:
                print(f"    {f['function'][:60]:60} x{f['calls_per_step']:5.1f}  own {f['own_us_per_step']:7.1f} us"
                      f"  cum {f['cum_us_per_step']:7.1f} us", flush=True)
            (out_dir / "engine_decode.json").write_text(json.dumps(out, indent=1))
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
