"""Load against a real server process over loopback: 200 concurrent streaming chats per round, a fifth of the
clients walking away at random points. No 5xx, every completed stream well-formed, nothing held afterwards,
and no memory growth across rounds. Seeded, so every run sends the same traffic."""
from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest
import torch

from server_process import running_server
from tiny import check_chat_stream, metric, serve_args, sse_payloads, synth

CLIENTS = 200
DISCONNECT_SHARE = 0.2
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return {arch: synth(arch, root) for arch in ("llama", "neollm")}


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch):
    """The server inherits this. The tiny model's ops are microseconds long; with OpenMP's threads spinning on a
    2-core machine that the client shares, each op costs milliseconds (8x slower steps, measured)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


async def _client(http: httpx.AsyncClient, name: str, rng: random.Random, outcome: dict,
                  long_share: float = 0.0) -> None:
    words = rng.randint(1, 40)
    if long_share and rng.random() < long_share:     # a prompt of a few hundred tokens: chunked, mixed steps
        words = rng.randint(150, 300)
    body = {"model": name, "stream": True, "max_tokens": rng.randint(4, 16), "temperature": rng.choice([0, 0.8]),
            "messages": [{"role": "user", "content": " ".join(rng.choices(WORDS, k=words))}]}
    leave = rng.random() < DISCONNECT_SHARE
    leave_after = rng.choice([0, 0, rng.randint(1, 8)]) if leave else None  # 0: right after sending

    async def run() -> None:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            outcome["status"] = r.status_code
            if r.status_code != 200:
                await r.aread()
                return
            text, events = "", 0
            async for chunk in r.aiter_text():
                text += chunk
                events = text.count("\n\n")
                if leave_after is not None and events >= leave_after:
                    outcome["left"] = True
                    return        # closing the stream drops the connection mid-generation
            outcome["events"] = sse_payloads(text)

    if leave_after == 0:
        task = asyncio.create_task(run())
        await asyncio.sleep(rng.uniform(0, 0.05))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        outcome["left"] = True
    else:
        await run()


async def _round(url: str, seed: int, long_share: float = 0.0) -> list[dict]:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=CLIENTS + 10, max_keepalive_connections=CLIENTS + 10)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        name = (await http.get("/v1/models")).json()["data"][0]["id"]
        outcomes = [{} for _ in range(CLIENTS)]
        await asyncio.gather(*[_client(http, name, random.Random(rng.random()), o, long_share) for o in outcomes])
    return outcomes


def _settled_metrics(url: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(f"{url}/metrics").text
        held = [metric(text, f"hybridserve:{name}") for name in (
            "num_requests_running", "num_requests_waiting", "num_requests_inflight", "kv_pages_used",
            "state_slots_used")]
        if all(v == 0 for values in held for v in values) or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def _check_round(url: str, outcomes: list[dict]) -> str:
    statuses = [o["status"] for o in outcomes if "status" in o]
    assert not [s for s in statuses if s >= 500], statuses
    completed = [o["events"] for o in outcomes if "events" in o]
    left = sum(1 for o in outcomes if o.get("left"))
    assert len(completed) + left == CLIENTS and 20 <= left <= 60, (len(completed), left)
    assert all(check_chat_stream(events) == "finished" for events in completed)
    text = _settled_metrics(url)
    for name in ("num_requests_running", "num_requests_waiting", "num_requests_inflight", "kv_pages_used",
                 "state_slots_used"):
        assert all(v == 0 for v in metric(text, f"hybridserve:{name}")), (name, text)
    return text


def test_load_rounds_without_leaks(models):
    """Three rounds on a paged-KV model. RSS is compared from the end of round 1 (allocator pools, the
    tokenizer and torch caches have reached their working size) to the end of round 3. 15% leaves room
    for allocator fragmentation noise, while a per-request leak of anything holding tensors or token lists
    (e.g. a kept sequence or queue) would grow by the same amount every round; the in-flight gauge, which
    counts the AsyncEngine's open request entries, must also return to exactly zero."""
    args = serve_args(models["llama"], "--max-num-seqs", "64", "--max-queued-requests", "512",
                      "--kv-cache-memory", "64MiB")
    with running_server(*args) as (url, proc):
        rss = []
        for seed in range(3):
            _check_round(url, asyncio.run(_round(url, seed)))
            rss.append(rss_kib(proc.pid))
        assert rss[2] < rss[0] * 1.15, rss


def test_load_round_on_a_model_with_state_slots(models):
    args = serve_args(models["neollm"], "--max-num-seqs", "64", "--max-queued-requests", "512",
                      "--kv-cache-memory", "64MiB")
    with running_server(*args) as (url, _):
        text = httpx.get(f"{url}/metrics").text
        assert metric(text, "hybridserve:state_slots_total") and min(metric(text, "hybridserve:state_slots_total")) >= 64
        _check_round(url, asyncio.run(_round(url, 7)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["llama", "kotodama", "neollm", "spartacus", "nanohammer"])
def test_load_rounds_on_gpu(tmp_path_factory, arch):
    """The same traffic on the GPU fast path, as the server runs on CUDA by default: bf16, decode and prefill
    CUDA graphs, async scheduling; one client in twenty sends a prompt of a few hundred tokens (chunked
    prefill beside decode rows). Three rounds: no 5xx, every finished stream well-formed, no request, page or
    slot held after each, and the CUDA allocator's bytes in tensors do not grow from round 2 to round 3. A
    device tensor kept per request (a row of logits is ~200 KB at this vocabulary) would add megabytes a
    round; 4 MiB leaves room for allocator rounding only."""
    model = synth(arch, tmp_path_factory.mktemp("synth"))
    args = ["--model", str(model), "--device", "cuda", "--log-level", "warning", "--max-num-seqs", "64",
            "--max-queued-requests", "512", "--kv-cache-memory", "64MiB"]
    with running_server(*args, timeout=600) as (url, _):
        allocated = []
        for seed in range(3):
            text = _check_round(url, asyncio.run(_round(url, seed, long_share=0.05)))
            allocated += metric(text, "hybridserve:device_memory_bytes", 'kind="allocated"')
        assert len(allocated) == 3 and allocated[2] - allocated[1] <= 4 << 20, allocated
