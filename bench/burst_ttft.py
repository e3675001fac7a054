"""Time to first token when prompts arrive together: C requests of a P-token prompt arriving at once or one every
`gap` ms, on the engine as the server's engine thread drives it (new arrivals taken in before each step), no
HTTP. Per request: TTFT from its arrival to the step that returned its first token. Per step: its wall time and
what it ran (how many prompt chunks and decode rows, how many tokens, and the path: the decode graph, a mixed
step as decode graph + prefill graph(s), a prefill graph, or one eager forward).

The baseline, same run: one prompt alone (its TTFT is one prefill-graph replay), and the same bursts with
prefill graphs of one sequence (PREFILL_GRAPH_CAPACITIES = (1,): a step of several prompts runs as one eager
forward, a step of decode rows and one prompt as the decode graph and that prompt's graph; the engine before
batched prefill graphs).

Usage (GPU machine): python bench/burst_ttft.py --tokenizer DIR [--archs ...] → $OUT/burst_ttft.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch

from decode_latency import load_full
from engine_decode import new_engine
from hybridserve.engine import cuda_graphs
from hybridserve.engine.request import SamplingParams
from hybridserve.weights.tokenizer import Tokenizer


class PathLog:
    """Wraps an engine's runner to note what each step ran (with async scheduling one engine step may launch
    two forwards: its own and the next decode step)."""

    def __init__(self, eng):
        self.runs: list[dict] = []
        runner = self.runner = eng.runner
        self.originals = [(runner, "run", runner.run), (runner.model, "forward", runner.model.forward)]
        run, forward = runner.run, runner.model.forward

        def logged_run(chunks, *a, **k):
            prompts = sum(len(c.tokens) > 1 for c in chunks)
            self.runs.append({"paths": [], "prompts": prompts, "decode_rows": len(chunks) - prompts,
                              "tokens": sum(len(c.tokens) for c in chunks)})
            return run(chunks, *a, **k)

        def note(label):
            if self.runs:
                self.runs[-1]["paths"].append(label)

        def logged_forward(*a, **k):
            note("eager")
            return forward(*a, **k)
        runner.run = logged_run
        runner.model.forward = logged_forward
        for obj, name, label in ((runner.graphs, "run_chunks", "decode_graph"), (runner.prefill_graphs, "run",
                                                                                  "prefill_graph")):
            orig = getattr(obj, name)
            self.originals.append((obj, name, orig))

            def wrapped(*a, _orig=orig, _label=label, **k):
                note(_label)
                return _orig(*a, **k)
            setattr(obj, name, wrapped)

    def take(self) -> list[dict]:
        runs, self.runs = self.runs, []
        for r in runs:
            r["path"] = "+".join(r.pop("paths")) or "none"
        return runs

    def close(self) -> None:
        for obj, name, orig in self.originals:
            setattr(obj, name, orig)


def burst(eng, log: PathLog, clients: int, prompt_len: int, gap_ms: float, max_tokens: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(100, 40000, (prompt_len,), generator=g).tolist() for _ in range(clients)]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    arrival = [i * gap_ms / 1e3 for i in range(clients)]
    first: dict[str, float] = {}
    steps = []
    nxt = 0
    t0 = time.perf_counter()
    while nxt < clients or eng.has_work():
        now = time.perf_counter() - t0
        while nxt < clients and arrival[nxt] <= now:
            eng.add_request(f"b{nxt}", prompts[nxt], params)
            nxt += 1
        if not eng.has_work():
            continue                     # the engine thread waits for the next arrival
        ts = time.perf_counter()
        outs = eng.step()
        te = time.perf_counter()
        runs = log.take()
        if runs:
            steps.append({"start_ms": 1e3 * (ts - t0), "ms": 1e3 * (te - ts), "runs": runs,
                          "prompts": sum(r["prompts"] for r in runs)})
        for o in outs:
            if o.new_token_ids and o.request_id not in first:
                first[o.request_id] = te - t0 - arrival[int(o.request_id[1:])]
    assert len(first) == clients
    assert eng.pools.pages.num_used == 0 and (not eng.pools.layout.states or eng.pools.slots.num_used == 0)
    ttft = sorted(1e3 * v for v in first.values())
    prefill = [s for s in steps if s["prompts"] > 0]
    return {"clients": clients, "prompt_len": prompt_len, "gap_ms": gap_ms,
            "ttft_ms_median": statistics.median(ttft), "ttft_ms_max": ttft[-1], "ttft_ms_min": ttft[0],
            "prefill_steps": len(prefill), "prefill_step_ms": sum(s["ms"] for s in prefill),
            "paths": sorted({r["path"] for s in prefill for r in s["runs"] if r["prompts"]}),
            "steps": prefill}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=os.environ.get("HYBRIDSERVE_TOKENIZER_DIR"))
    ap.add_argument("--archs", default="spartacus,kotodama,nanohammer,neollm")
    ap.add_argument("--clients", default="4,8,32")
    ap.add_argument("--gaps", default="0,0.5,2")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    tok = Tokenizer.from_hf_dir(args.tokenizer)
    builds = {"batched": cuda_graphs.PREFILL_GRAPH_CAPACITIES, "one_seq_graphs": (1,)}
    for arch in args.archs.split(","):
        model = load_full(arch)
        for build, capacities in builds.items():
            cuda_graphs.PREFILL_GRAPH_CAPACITIES = capacities
            eng = new_engine(model, tok, budget=8 << 30, max_num_seqs=64)
            log = PathLog(eng)
            burst(eng, log, 1, args.prompt_len, 0, 2, 0)                                  # warm-up
            alone = [burst(eng, log, 1, args.prompt_len, 0, 2, s)["ttft_ms_median"] for s in range(5)]
            out["rows"].append({"arch": arch, "build": build, "clients": 1, "ttft_ms_median": statistics.median(alone)})
            for r in range(args.rounds):
                for c in map(int, args.clients.split(",")):
                    for gap in map(float, args.gaps.split(",")):
                        row = {"arch": arch, "build": build, "round": r,
                               **burst(eng, log, c, args.prompt_len, gap, args.max_tokens, 100 * r + c)}
                        out["rows"].append(row)
                        print(f"{arch:10} {build:12} C={c:3} gap {gap:4} ms  TTFT median {row['ttft_ms_median']:7.2f} "
                              f"max {row['ttft_ms_max']:7.2f} ms  {row['prefill_steps']} prefill steps "
                              f"{row['prefill_step_ms']:7.2f} ms  {row['paths']}", flush=True)
            print(f"{arch:10} {build:12} alone: TTFT {statistics.median(alone):.2f} ms", flush=True)
            (out_dir / "burst_ttft.json").write_text(json.dumps(out, indent=1))
            log.close()
            del eng, log
            gc.collect()
            torch.cuda.empty_cache()
        del model
        gc.collect()
        torch.cuda.empty_cache()
    cuda_graphs.PREFILL_GRAPH_CAPACITIES = builds["batched"]


if __name__ == "__main__":
    main()
