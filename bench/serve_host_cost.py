"""Host cost of streaming: CPU time of the server's event-loop thread per streamed event.

A real uvicorn server in this process (its event loop on the main thread, the engine on its own thread) on a
small synthetic checkpoint, C clients streaming /v1/completions from a separate process (httpx), greedy,
ignore_eos. Per round: the event-loop thread's CPU seconds (time.thread_time) over the SSE events the
clients received. The engine's step time does not enter the figure (another thread), so it runs on a CPU
machine as well; rounds alternate the server's A/B knobs in one process.

Usage: python bench/serve_host_cost.py [--concurrency 32] [--max-tokens 128] [--rounds 3] [--profile 30]
[--http h11,httptools]
→ $OUT/serve_host_cost.json
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import uvicorn

import hybridserve.server.app as app_module
from hybridserve.engine.build import build_engine
from hybridserve.engine.config import EngineConfig
from hybridserve.server.app import create_app
from hybridserve.weights.synth import write_synthetic

CLIENTS = r'''
import asyncio, json, sys, time
import httpx
C, tokens, url = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
async def one(http, model, i):
    body = {"model": model, "prompt": [100 + i, 200, 300], "max_tokens": tokens, "ignore_eos": True,
            "stream": True, "temperature": 0}
    n = 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            n += line.startswith("data: {")
    return n
async def main():
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        t = time.perf_counter()
        events = await asyncio.gather(*[one(http, model, i) for i in range(C)])
        print(json.dumps({"events": sum(events), "wall_s": time.perf_counter() - t}))
asyncio.run(main())
'''

# A/B knobs: name -> (module, attribute, value)
VARIANTS = {"text_events_off": (app_module, "FAST_TEXT_EVENTS", False),
            "direct_single_off": (app_module, "DIRECT_SINGLE_STREAM", False),
            "stream_merge_off": (app_module, "MERGE_QUEUED", False)}


async def clients(url: str, C: int, tokens: int) -> dict:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", CLIENTS, str(C), str(tokens), url,
                                                stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert proc.returncode == 0, "the client process failed"
    return json.loads(out)


async def measure(url: str, C: int, tokens: int, profiler=None) -> dict:
    """One round: the loop's CPU time per event the clients got and per token generated (a stream that fell
    behind gets several tokens in one event: server/app.py MERGE_QUEUED)."""
    if profiler is not None:
        profiler.enable()
    cpu0 = time.thread_time()
    res = await clients(url, C, tokens)
    cpu = time.thread_time() - cpu0
    if profiler is not None:
        profiler.disable()
    assert res["events"] >= C, res
    return {"events": res["events"], "tokens": C * tokens, "wall_s": res["wall_s"], "loop_cpu_s": cpu,
            "loop_cpu_us_per_event": 1e6 * cpu / res["events"], "loop_cpu_us_per_token": 1e6 * cpu / (C * tokens)}


async def run(args, model_dir: Path) -> dict:
    """A server per HTTP implementation (`--http`), all on this event loop; the rounds take them and the knobs in
    turn (only one server is busy at a time, so the loop's CPU time is that server's)."""
    impls = args.http.split(",")
    servers, urls, engines = [], {}, []
    for i, impl in enumerate(impls):
        engine = build_engine(EngineConfig(model=str(model_dir), device=args.device, max_num_seqs=args.concurrency,
                                           max_model_len=512))
        server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=args.port + i,
                                               log_level="warning", http=impl))
        servers.append((server, asyncio.create_task(server.serve())))
        engines.append(engine)
        urls[impl] = f"http://127.0.0.1:{args.port + i}"
    while not all(s.started for s, _ in servers) or any(e.health() is not None for e in engines):
        await asyncio.sleep(0.05)
    names = [""] + [v for v in args.variants.split(",") if v]
    label = {(impl, name): (name or "default") + ("" if len(impls) == 1 else f" http={impl}")
             for impl in impls for name in names}
    runs = {v: [] for v in label.values()}
    try:
        for url in urls.values():
            await measure(url, args.concurrency, 16)          # warm-up
        for _ in range(args.rounds):
            for (impl, name), key in label.items():
                mod, attr, value = VARIANTS[name] if name else (None, None, None)
                before = getattr(mod, attr) if mod else None
                if mod:
                    setattr(mod, attr, value)
                try:
                    runs[key].append(await measure(urls[impl], args.concurrency, args.max_tokens))
                finally:
                    if mod:
                        setattr(mod, attr, before)
        if args.profile:      # one more default round under cProfile (this thread only: the event loop)
            prof = cProfile.Profile()
            await measure(urls[impls[0]], args.concurrency, args.max_tokens, prof)
            stats = io.StringIO()
            pstats.Stats(prof, stream=stats).sort_stats("tottime").print_stats(args.profile)
            runs["profile"] = stats.getvalue()
    finally:
        for server, serving in servers:
            server.should_exit = True
            await serving
    return runs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="kotodama")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default="text_events_off,direct_single_off",
                    help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--http", default="h11", help="uvicorn's HTTP implementations, comma list (h11, httptools): a "
                    "server each, rounds in turn")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--profile", type=int, default=0, help="also profile one default round (cProfile, the event "
                    "loop's thread) and print this many functions by own time")
    ap.add_argument("--tokenizer", default=os.environ.get("HYBRIDSERVE_TOKENIZER_DIR"),
                    help="a directory with the tokenizer files weights/synth.py writes (machines without the "
                         "embedded package)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_synthetic(args.arch, args.size, Path(tmp) / args.arch, seed=0,
                                    tokenizer_from=Path(args.tokenizer) if args.tokenizer else None)
        runs = asyncio.run(run(args, model_dir))
    profile = runs.pop("profile", None)
    import torch
    out = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "torch": torch.__version__, "arch": args.arch, "size": args.size, "concurrency": args.concurrency,
           "max_tokens": args.max_tokens, "runs": runs,
           "median_loop_cpu_us_per_event": {k: statistics.median(r["loop_cpu_us_per_event"] for r in v)
                                            for k, v in runs.items()},
           "median_loop_cpu_us_per_token": {k: statistics.median(r["loop_cpu_us_per_token"] for r in v)
                                            for k, v in runs.items()}}
    for k, v in out["median_loop_cpu_us_per_event"].items():
        each = ", ".join(f"{r['loop_cpu_us_per_event']:.1f}" for r in runs[k])
        print(f"{k:18} {v:7.1f} us of event-loop CPU per streamed event ({each}), "
              f"{out['median_loop_cpu_us_per_token'][k]:.1f} per token", flush=True)
    if profile:
        out["profile"] = profile
        print(profile)
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    (out_dir / "serve_host_cost.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
