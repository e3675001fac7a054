"""Served latency: a real `hybridserve serve` process (uvicorn) on a synthetic full-size checkpoint, C streaming
clients at once through /v1/completions (token-id prompts, ignore_eos), with async scheduling off and on in the
same run. Per request, from the SSE events' arrival times: TTFT, time per output token after the first (TPOT)
and the gaps between events (ITL); per run: their medians and p99, output tokens/s, and after the run the
server's /metrics must show no KV page or state slot in use; it also gives the Triton compiles since the
server turned ready (a stall each on a machine with an empty Triton cache), and each process's Python garbage
collections over the round (full ones, their seconds, the longest pause since ready; `--gc-freeze on,off` serves
with the server process's start-up heap frozen or not, `api`, `engine`, `both` freeze those processes,
engine/gc_pauses.py), when in the round its longest gaps fell, the server's and engine process's CPU time
over the round's (cores busy), and the server's event-loop lag (server/loop_lag.py: mean, share over 10 ms).
`--client-procs 4` spreads a round's streams over four client processes, so that one client's event loop does not
hold up the arrival times it records. `--api-servers 1,2,4` serves each setting with that many API processes in
front of the engine process (--api-server-count; their CPU time summed as `cpu_api`, each as `cpu_api-<i>`). The
server's own mean TTFT over
the round (its time_to_first_token histogram: engine submission to first token) sits beside the clients'
median, so the part spent in the client and on the HTTP side before submission shows.

Usage (GPU machine; fastapi, uvicorn, pydantic from wheels): python bench/serve_latency.py --tokenizer DIR
[--archs spartacus,kotodama] [--concurrency 1,8,32] [--clients httpx,raw] [--merge on,off] [--core process,thread]
[--gc-freeze on,off] [--client-procs 1,4] [--http h11,httptools] [--api-servers 1,2,4]
[--trees new=DIR,old=DIR,new=DIR,old=DIR] → $OUT/serve_latency.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from server_process import cpu_seconds as process_cpu, named_children, running_server  # noqa: E402
from tiny import metric  # noqa: E402
from hybridserve.weights.synth import write_synthetic  # noqa: E402

SAMPLING = {"greedy": {"temperature": 0.0}, "sampled": {"temperature": 0.8, "top_p": 0.95},
            "sampled_top_k": {"temperature": 0.8, "top_p": 0.95, "top_k": 50}}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def request_body(model: str, prompt: list[int], max_tokens: int, knobs: dict) -> dict:
    # special tokens shown as text: a random-weight model may pick them (with ignore_eos, EOS too), and the server
    # sends no event for a token without text, so a stream of them would have no arrival times
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "skip_special_tokens": False, "stream_options": {"include_usage": True}, **knobs}


class Arrivals:
    """A stream's SSE events as they arrive: the times of those carrying text, and the usage at the end."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.times: list[float] = []
        self.usage: dict | None = None

    def event(self, data: bytes | str, now: float) -> None:
        """One event's data (after "data: ")."""
        if data in ("[DONE]", b"[DONE]"):
            return
        event = json.loads(data)
        if event.get("usage"):
            self.usage = event["usage"]
        if event.get("choices") and event["choices"][0].get("text"):
            self.times.append(now)

    def timings(self, max_tokens: int) -> dict:
        n = self.usage["completion_tokens"]
        assert n == max_tokens, self.usage
        t = self.times
        assert t, f"{n} tokens and no event with text"
        # a stream whose reader fell behind for its whole length gets its tokens in one merged event: no time per
        # token (None), counted per round as streams_one_event
        return {"ttft": t[0] - self.t0, "tpot": (t[-1] - t[0]) / (n - 1) if len(t) > 1 else None,
                "gaps": [b - a for a, b in zip(t, t[1:])], "gap_starts": t[:-1], "end": t[-1] - self.t0,
                "tokens": n}


async def one_request(http: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int, knobs: dict,
                      timed: bool = True) -> dict | None:
    seen = Arrivals()
    async with http.stream("POST", "/v1/completions", json=request_body(model, prompt, max_tokens, knobs)) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                seen.event(line[6:], time.perf_counter())
    return seen.timings(max_tokens) if timed else None


async def one_request_raw(url: str, model: str, prompt: list[int], max_tokens: int, knobs: dict,
                          timed: bool = True) -> dict | None:
    """`one_request` over a bare asyncio connection: one write, then the chunked SSE body read chunk by chunk.
    It costs the client's event loop far less per event than httpx, whose own per-event work at C = 32 delays
    the arrival times the bench records (a client-side share of TTFT and TPOT, not the server's)."""
    u = httpx.URL(url)
    body = json.dumps(request_body(model, prompt, max_tokens, knobs)).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {u.host}:{u.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    seen = Arrivals()
    reader, writer = await asyncio.open_connection(u.host, u.port)
    buf = b""
    try:
        writer.write(head + body)
        status = await reader.readline()
        assert b" 200 " in status, status
        headers = []
        while (line := await reader.readline()) not in (b"\r\n", b""):
            headers.append(line.lower())
        assert b"transfer-encoding: chunked\r\n" in headers, headers
        while size := int((await reader.readline()).split(b";")[0], 16):
            buf += await reader.readexactly(size)
            await reader.readexactly(2)
            now = time.perf_counter()
            *events, buf = buf.split(b"\n\n")
            for ev in events:
                if ev.startswith(b"data: "):
                    seen.event(ev[6:], now)
    finally:
        writer.close()
    return seen.timings(max_tokens) if timed else None


def scrape(url: str) -> str:
    return httpx.get(f"{url}/metrics").text


def server_ttft(text: str) -> tuple[float, float]:
    """(sum of seconds, count) of the server's time_to_first_token histogram, from /metrics text."""
    return (sum(metric(text, "hybridserve:time_to_first_token_seconds_sum")),
            sum(metric(text, "hybridserve:time_to_first_token_seconds_count")))


PROCESSES = ("api", "engine", *(f"api-{i}" for i in range(16)))   # /metrics' process labels


def gc_figures(text: str) -> dict[str, tuple[float, float, float]]:
    """Per process (api, or api-<i> with several API processes, and engine): full collections and all
    collections' seconds since ready, and the longest pause since ready, from /metrics text."""
    out = {}
    for process in PROCESSES:
        p = f'process="{process}"'
        full = metric(text, "hybridserve:gc_collections_total", p, 'generation="2"')
        if full:
            out[process] = (full[0], sum(metric(text, "hybridserve:gc_pause_seconds_total", p)),
                            max(metric(text, "hybridserve:gc_pause_longest_seconds", p)))
    return out


def lag_figures(text: str) -> tuple[float, float, float]:
    """The server's event-loop lag histogram so far, from /metrics text: (sum of seconds, samples, samples within
    10 ms)."""
    return (sum(metric(text, "hybridserve:event_loop_lag_seconds_sum")),
            sum(metric(text, "hybridserve:event_loop_lag_seconds_count")),
            sum(metric(text, "hybridserve:event_loop_lag_seconds_bucket", 'le="0.01"')))


async def _streams(url: str, model: str, prompts: list[list[int]], max_tokens: int, knobs: dict, client: str,
                   timed: bool) -> list[dict | None]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        if client == "raw":
            return await asyncio.gather(*[one_request_raw(url, model, p, max_tokens, knobs, timed) for p in prompts])
        return await asyncio.gather(*[one_request(http, model, p, max_tokens, knobs, timed) for p in prompts])


def client_share(url: str, model: str, prompts: list[list[int]], max_tokens: int, knobs: dict, client: str,
                 timed: bool, start_at: float) -> list[dict | None]:
    """A client process's share of a round's streams, opened at `start_at` (time.perf_counter is the system's
    monotonic clock on Linux, the same in every process, so the arrival times of all shares compare)."""
    while (wait := start_at - time.perf_counter()) > 0:
        time.sleep(min(wait, 0.005))
    return asyncio.run(_streams(url, model, prompts, max_tokens, knobs, client, timed))


def run_round(url: str, model: str, clients: int, prompt_len: int, max_tokens: int, knobs: dict, seed: int,
              client: str = "httpx", warmup: bool = False, pool: tuple[ProcessPoolExecutor, int] | None = None,
              server_pid: int | None = None) -> dict:
    """One round of `clients` streams at once; a warm-up round only runs them (a short stream of a fast model
    under load may arrive as one merged event, which has no time per token). With a `pool` (the executor and its
    process count), the streams are spread over its client processes: one Python client reading 128 streams
    spends most of its time on its own event loop, and the arrival times it records then include its own
    queueing. The server's figures (its TTFT histogram, garbage collections, event-loop lag and, with
    `server_pid`, each process's CPU time) are read once just before and once just after the round, so they
    cover the round's own span."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(100, 40000) for _ in range(prompt_len)] for _ in range(clients)]
    if not warmup:
        text0 = scrape(url)
        cpu_before = cpu_seconds(server_pid) if server_pid is not None else {}
    if pool is None:
        t0 = time.perf_counter()
        done = asyncio.run(_streams(url, model, prompts, max_tokens, knobs, client, not warmup))
    else:
        executor, n = pool
        t0 = time.perf_counter() + 0.1
        shares = [executor.submit(client_share, url, model, prompts[i::n], max_tokens, knobs, client, not warmup,
                                  t0) for i in range(n)]
        done = [d for f in shares for d in f.result()]
    wall = time.perf_counter() - t0
    if warmup:
        return {}
    # each process's CPU time over the round's wall time (1.0: a core busy throughout)
    spent = {f"cpu_{p}": (t - cpu_before[p]) / wall for p, t in cpu_seconds(server_pid).items()} if cpu_before else {}
    text1 = scrape(url)
    spent |= lag_round(lag_figures(text0), lag_figures(text1)) | gc_round(gc_figures(text0), gc_figures(text1))
    before, after = server_ttft(text0), server_ttft(text1)
    gaps = [g for d in done for g in d["gaps"]]
    # the round's longest gaps, each as (ms after the round began, ms long): when in the round the stalls fall
    longest = sorted(((1e3 * (a - t0), 1e3 * g) for d in done for a, g in zip(d["gap_starts"], d["gaps"])),
                     key=lambda x: -x[1])
    nan = float("nan")
    return {"client": client, "client_procs": pool[1] if pool is not None else 1, "clients": clients,
            "wall_s": wall,
            "output_tok_per_s": sum(d["tokens"] for d in done) / wall,
            "ttft_ms_median": 1e3 * statistics.median(d["ttft"] for d in done),
            "ttft_ms_max": 1e3 * max(d["ttft"] for d in done),
            "ttft_ms_server_mean": 1e3 * (after[0] - before[0]) / max(after[1] - before[1], 1),
            "tpot_ms_median": 1e3 * statistics.median([d["tpot"] for d in done if d["tpot"] is not None] or [nan]),
            "streams_one_event": sum(d["tpot"] is None for d in done),
            # a short round's tokens may all arrive in one event after the first (merged): no gaps then
            "itl_ms_median": 1e3 * statistics.median(gaps) if gaps else float("nan"),
            "itl_ms_p99": 1e3 * pct(gaps, 0.99) if gaps else float("nan"),
            "itl_ms_max": 1e3 * max(gaps) if gaps else float("nan"),
            "itl_over_50ms": sum(g > 0.05 for g in gaps),
            "itl_longest_at_ms": [[round(a, 1), round(g, 1)] for a, g in longest[:12]], **spent}


def lag_round(before: tuple, after: tuple) -> dict:
    """The round's mean event-loop lag and the share of its samples over 10 ms."""
    n = after[1] - before[1]
    if n <= 0:
        return {}
    return {"loop_lag_ms_mean": 1e3 * (after[0] - before[0]) / n,
            "loop_lag_over_10ms": 1 - (after[2] - before[2]) / n}


def gc_round(before: dict, after: dict) -> dict:
    """Per process: full collections and seconds collecting in the round, the longest pause since ready."""
    row = {}
    for process, (full, seconds, longest) in after.items():
        full0, seconds0, _ = before.get(process, (0.0, 0.0, 0.0))
        row |= {f"gc_{process}_full": full - full0, f"gc_{process}_ms": 1e3 * (seconds - seconds0),
                f"gc_{process}_longest_ms": 1e3 * longest}
    return row


def cpu_seconds(server_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far, from /proc (Linux), of the engine process ("engine", a child named
    hs-engine) and of the API process: the server process itself ("api"), or with several, each child named
    hs-api-<i> ("api-<i>", and their sum as "api")."""
    out = {name[3:]: process_cpu(pid) for name, pid in named_children(server_pid).items()}
    apis = [v for k, v in out.items() if k.startswith("api-")]
    out["api"] = sum(apis) if apis else process_cpu(server_pid)
    return out


def held(url: str) -> dict:
    """KV pages and state slots in use, from /metrics, once the server has settled."""
    deadline = time.monotonic() + 10
    while True:
        text = scrape(url)
        pages = sum(metric(text, "hybridserve:kv_pages_used"))
        slots = sum(metric(text, "hybridserve:state_slots_used"))
        jit = sum(metric(text, "hybridserve:jit_compiles_after_ready_total"))
        if pages == slots == 0 or time.monotonic() > deadline:
            return {"kv_pages_used": pages, "state_slots_used": slots, "jit_compiles_after_ready": jit}
        time.sleep(0.2)


_pools: dict[int, tuple[ProcessPoolExecutor, int]] = {}


def client_pool(procs: int) -> tuple[ProcessPoolExecutor, int] | None:
    """A pool of `procs` client processes (None for 1), started once and warmed (imports) before use."""
    if procs <= 1:
        return None
    if procs not in _pools:
        executor = ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn"))
        list(executor.map(time.sleep, [0.5] * procs))
        _pools[procs] = (executor, procs)
    return _pools[procs]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True, help="a directory with the files weights/synth.py writes")
    ap.add_argument("--archs", default="spartacus,kotodama")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--modes", default="greedy,sampled")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--scheduling", default="sync,async", help="engine step modes served, comma list")
    ap.add_argument("--size", default="full", help="synthetic checkpoint size: full, or tiny (a CPU run)")
    ap.add_argument("--merge", default="on", help="server settings of HYBRIDSERVE_STREAM_MERGE, comma list: on, "
                    "off (one event per token even for a stream that fell behind)")
    ap.add_argument("--loops", default="auto", help="the server's event loop (--loop), comma list: auto, asyncio, "
                    "uvloop; one server process each")
    ap.add_argument("--rounds", type=int, default=1, help="measured rounds per setting (each its own row)")
    ap.add_argument("--core", default="process", help="where the engine core runs, comma list: process "
                    "(--engine-process), thread (--no-engine-process); one server process each")
    ap.add_argument("--gc-freeze", default="on", help="servers with the start-up heap frozen once warm or not "
                    "(--gc-freeze / --no-gc-freeze), comma list: on (the default: the serving process), off, api, "
                    "engine or both (those processes); one server process each")
    ap.add_argument("--clients", default="httpx", help="client kinds, comma list: httpx, raw (bare asyncio "
                    "connections, a lighter client); each round is run with each in turn")
    ap.add_argument("--http", default="auto", help="the server's HTTP implementation (--http), comma list: auto, "
                    "h11, httptools; one server process each")
    ap.add_argument("--api-servers", default="1", help="API processes in front of the engine process "
                    "(--api-server-count), comma list: a server each")
    ap.add_argument("--trees", default="", help="comma list of NAME=DIR: serve each setting from each tree in turn, "
                    "DIR (a directory holding a hybridserve package) first on the server's PYTHONPATH; a name may "
                    "repeat, to alternate builds (the bench itself runs from its own tree)")
    ap.add_argument("--client-procs", default="1", help="client processes a round's streams are spread over, comma "
                    "list (each round is run with each in turn): 1 reads every stream on this process's event loop")
    args = ap.parse_args()
    conc = [int(c) for c in args.concurrency.split(",")]
    trees = [tuple(t.split("=", 1)) for t in args.trees.split(",")] if args.trees else [None]
    base_path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    out = {"device": device, "torch": torch.__version__, "prompt_len": args.prompt_len,
           "max_tokens": args.max_tokens, "rows": []}
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    for arch in args.archs.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            path = write_synthetic(arch, args.size, Path(tmp) / arch, seed=0, tokenizer_from=Path(args.tokenizer))
            for flag, merge, core, ev, freeze, http, apis, tree in [
                    ({"sync": "--no-async-scheduling", "async": "--async-scheduling"}[m], g, k, e, f, h, int(a), t)
                    for m in args.scheduling.split(",") for g in args.merge.split(",")
                    for k in args.core.split(",") for e in args.loops.split(",") for f in args.gc_freeze.split(",")
                    for h in args.http.split(",") for a in args.api_servers.split(",") for t in trees]:
                if tree is not None:     # the server imports hybridserve from this tree's directory first
                    os.environ["PYTHONPATH"] = os.pathsep.join([tree[1], *base_path])
                os.environ["HYBRIDSERVE_STREAM_MERGE"] = "1" if merge == "on" else "0"
                os.environ["HYBRIDSERVE_GC_FREEZE_PROCESSES"] = {"api": "api", "engine": "engine",
                                                                 "both": "api,engine"}.get(freeze, "api")
                t0 = time.perf_counter()
                with running_server("--model", str(path), "--max-num-seqs", str(max(conc)), "--max-model-len",
                                    "2048", "--log-level", "warning", flag,
                                    {"process": "--engine-process", "thread": "--no-engine-process"}[core],
                                    "--loop", ev, "--no-gc-freeze" if freeze == "off" else "--gc-freeze",
                                    "--http", http, "--api-server-count", str(apis),
                                    timeout=600) as (url, server):
                    start_s = time.perf_counter() - t0
                    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
                    for mode in args.modes.split(","):
                        for c, client, procs in [(c, k, int(n)) for c in conc for k in args.clients.split(",")
                                                 for n in args.client_procs.split(",")]:
                            pool = client_pool(procs)
                            run_round(url, model, c, args.prompt_len, 16, SAMPLING[mode], 1, client, warmup=True,
                                      pool=pool)
                            for rnd in range(args.rounds):
                                row = {"arch": arch, "tree": tree[0] if tree else None,
                                       "engine_process": core == "process", "loop": ev,
                                       "async_scheduling": flag == "--async-scheduling", "mode": mode,
                                       "stream_merge": merge == "on", "gc_freeze": freeze, "http": http,
                                       "api_servers": apis,
                                       "server_start_s": start_s, "round": rnd,
                                       **run_round(url, model, c, args.prompt_len, args.max_tokens,
                                                   SAMPLING[mode], 2 + rnd, client, pool=pool, server_pid=server.pid),
                                       **held(url)}
                                out["rows"].append(row)
                                gc_text = " ".join(f"{p} {row[f'gc_{p}_full']:.0f} full {row[f'gc_{p}_ms']:.0f} ms "
                                                   f"(longest {row[f'gc_{p}_longest_ms']:.0f})"
                                                   for p in PROCESSES if f"gc_{p}_full" in row)
                                label = tree[0] if tree else ""
                                print(f"{arch:10} {label:6} {core:7} {ev:7} {flag:21} merge {merge:3} "
                                      f"gc freeze {freeze:3} "
                                      f"http {http:9} api x{apis} "
                                      f"{mode:7} C={c:3} "
                                      f"{client:5} x{procs} "
                                      f"TPOT {row['tpot_ms_median']:6.3f} ms  "
                                      f"ITL p50 {row['itl_ms_median']:6.3f} p99 {row['itl_ms_p99']:6.3f} max "
                                      f"{row['itl_ms_max']:6.1f}  TTFT "
                                      f"{row['ttft_ms_median']:7.2f} ms (max {row['ttft_ms_max']:7.1f}, server mean "
                                      f"{row['ttft_ms_server_mean']:6.1f})  "
                                      f"{row['output_tok_per_s']:8.0f} tok/s  "
                                      f"{row['streams_one_event']} one-event  held "
                                      f"{row['kv_pages_used']:.0f} pages {row['state_slots_used']:.0f} slots; "
                                      f"{row['jit_compiles_after_ready']:.0f} compiles after ready; gc {gc_text}; "
                                      f"CPU " + " ".join(f"{p} {row[f'cpu_{p}']:.2f}" for p in PROCESSES
                                                         if f"cpu_{p}" in row)
                                      + f"; loop lag {row.get('loop_lag_ms_mean', float('nan')):.1f} ms mean, "
                                      f"{100 * row.get('loop_lag_over_10ms', float('nan')):.0f} % over 10 ms",
                                      flush=True)
                            (out_dir / "serve_latency.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
