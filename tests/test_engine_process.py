"""The engine core in its own process (`--engine-process`, engine/core_process.py), behind a real server process:
the same outputs as the engine on a thread, errors and disconnects handled, nothing held after a load round,
the engine process's death reported (not hung on), a SIGTERM drain that takes the engine process down too, and
the step watchdog reading the engine process's step clock."""
from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from hybridserve.engine.async_engine import AsyncEngine, EngineUnhealthy, NotAccepting
from hybridserve.engine.build import build_llm_engine
from hybridserve.engine.core_process import start_engine_process
from hybridserve.engine.request import SamplingParams
from server_process import named_children, running_server
from test_load import _check_round, _round
from tiny import (async_engine, check_chat_stream, engine_config, metric, prompt_ids, serve_args, sse_payloads, synth,
                  time_step)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return synth("llama", tmp_path_factory.mktemp("synth"))


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")   # as in test_load: the server processes inherit it


def engine_pids(server_pid: int) -> list[int]:
    """The server's engine process (the child that names itself hs-engine)."""
    return [pid for name, pid in named_children(server_pid).items() if name == "hs-engine"]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def in_thread_text(model: Path, ids: list[int], params: SamplingParams) -> str:
    """The same request through an engine on a thread of this process."""
    async def run() -> str:
        engine = async_engine(model, max_num_seqs=4)
        await engine.start()
        try:
            return "".join([o.new_text async for o in engine.generate("ref", ids, params)])
        finally:
            await engine.shutdown()
    return asyncio.run(run())


def test_serves_like_the_engine_on_a_thread(model):
    ids = prompt_ids(24, salt=5)
    args = serve_args(model, "--engine-process", "--max-num-seqs", "8")
    with running_server(*args) as (url, proc):
        [child] = engine_pids(proc.pid)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        name = client.models.list().data[0].id
        got = client.completions.create(model=name, prompt=ids, max_tokens=12, temperature=0)
        assert got.choices[0].text == in_thread_text(model, ids, SamplingParams(max_tokens=12, temperature=0))
        assert got.usage.prompt_tokens == 24 and got.usage.completion_tokens == 12

        stream = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=8, n=2, stream=True, temperature=0.8, seed=3)
        finishes = {c.choices[0].index: c.choices[0].finish_reason for c in stream if c.choices[0].finish_reason}
        assert finishes.keys() == {0, 1}

        # Refused in the API process, with the engine's own words; the engine process keeps serving.
        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            client.completions.create(model=name, prompt=ids, max_tokens=100_000)
        bad = httpx.post(f"{url}/v1/completions", json={"model": name, "prompt": [10**9], "max_tokens": 2})
        assert bad.status_code == 400 and "outside the vocabulary" in bad.json()["error"]["message"]
        again = client.completions.create(model=name, prompt=ids, max_tokens=12, temperature=0)
        assert again.choices[0].text == got.choices[0].text

        text = httpx.get(f"{url}/metrics").text
        assert metric(text, "hybridserve:kv_pages_total")[0] > 0 and metric(text, "hybridserve:kv_pages_used") == [0]
        # the serving process froze its start-up heap once warm, the engine process did not (engine/gc_pauses.py)
        assert metric(text, "hybridserve:gc_frozen_objects", 'process="api"')[0] > 10_000
        assert metric(text, "hybridserve:gc_frozen_objects", 'process="engine"') == [0]
        assert len(metric(text, "hybridserve:gc_collections_total", 'process="engine"')) == 3
        for process in ("api", "engine"):   # both processes' CPU time, the engine's from its snapshots
            assert metric(text, "hybridserve:process_cpu_seconds_total", f'process="{process}"')[0] > 0, process
        assert alive(child)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert not alive(child)


def test_load_round_without_leaks(model):
    """test_load's traffic (200 streaming clients, a fifth leaving mid-stream) through an engine process, here
    with the collector left as it is (--no-gc-freeze)."""
    args = serve_args(model, "--engine-process", "--max-num-seqs", "64", "--max-queued-requests", "512",
                      "--kv-cache-memory", "64MiB", "--no-gc-freeze")
    with running_server(*args) as (url, _):
        _check_round(url, asyncio.run(_round(url, 11)))
        # --no-gc-freeze: nothing frozen; each process's collections were timed through the round
        text = httpx.get(f"{url}/metrics").text
        for process in ("api", "engine"):
            assert metric(text, "hybridserve:gc_frozen_objects", f'process="{process}"') == [0], process
            assert sum(metric(text, "hybridserve:gc_collections_total", f'process="{process}"')) > 0, process


def test_engine_process_death_is_reported(model):
    """The engine process killed mid-stream: the stream ends with an in-band error, /health turns 503 for good
    and new requests are refused; the server still shuts down cleanly."""
    args = serve_args(model, "--engine-process", "--max-num-seqs", "4")

    async def scenario(url: str, child: int) -> tuple[list[str], httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            name = (await http.get("/v1/models")).json()["data"][0]["id"]
            body = {"model": name, "messages": [{"role": "user", "content": "Tell me a story."}],
                    "max_tokens": 1000, "ignore_eos": True, "stream": True}
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                text = ""
                async for chunk in r.aiter_text():
                    if not text and chunk:
                        os.kill(child, signal.SIGKILL)
                    text += chunk
            deadline = time.monotonic() + 10
            while (health := await http.get("/health")).status_code == 200 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            refused = await http.post("/v1/chat/completions", json=body | {"stream": False, "max_tokens": 2})
            return sse_payloads(text), health, refused

    with running_server(*args) as (url, proc):
        [child] = engine_pids(proc.pid)
        events, health, refused = asyncio.run(scenario(url, child))
        assert check_chat_stream(events, cut_off_ok=True) != "finished"
        assert health.status_code == 503 and "engine process exited" in health.text
        assert refused.status_code == 503
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_sigterm_to_both_processes_still_drains(model):
    """A service manager may signal every process of the service: the engine process ignores SIGTERM, and the
    server's drain lets the stream in flight finish before both exit. Served over uvicorn's h11 (`--http h11`;
    the other tests take the default, httptools)."""
    args = serve_args(model, "--engine-process", "--max-num-seqs", "4", "--http", "h11")

    async def stream_through_sigterm(url: str, pids: list[int]) -> list[str]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            name = (await http.get("/v1/models")).json()["data"][0]["id"]
            body = {"model": name, "messages": [{"role": "user", "content": "Tell me a story."}],
                    "max_tokens": 200, "ignore_eos": True, "stream": True}
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                text = ""
                async for chunk in r.aiter_text():
                    if not text and chunk:
                        for pid in pids:
                            os.kill(pid, signal.SIGTERM)
                    text += chunk
            return sse_payloads(text)

    with running_server(*args) as (url, proc):
        [child] = engine_pids(proc.pid)
        events = asyncio.run(stream_through_sigterm(url, [child, proc.pid]))
        assert check_chat_stream(events) == "finished"
        assert proc.wait(timeout=60) == 0
    assert not alive(child)


def test_watchdog_reads_the_engine_process_step_clock(model):
    """The step watchdog across processes: a real 2,000-token prefill step in the engine process outlasts the
    watchdog (the step's start time is read from shared memory while the step runs), every stream ends with
    EngineUnhealthy, the server refuses new work, and shutdown ends the engine process."""
    base = dict(max_num_seqs=2, max_model_len=2048, max_num_batched_tokens=2048, kv_cache_memory=32 << 20)
    llm, _ = build_llm_engine(engine_config(model, **base))    # calibrate the steps on this machine first
    time_step(llm, 1)
    fast = max(time_step(llm, 1) for _ in range(3))
    slow = min(time_step(llm, 2000) for _ in range(2))
    if slow / 3 < 5 * fast:
        pytest.skip(f"this machine prefills too fast to make a slow step: {slow:.3f}s vs {fast:.3f}s")
    del llm
    core = start_engine_process(engine_config(model, **base, watchdog_timeout=slow / 3), "warning")

    async def run() -> None:
        engine = AsyncEngine(core, core.model_name)
        await engine.start()
        try:
            long = SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True)
            [a] = engine.submit([("a", prompt_ids(8), long)])
            assert (await a.__anext__()).new_token_ids
            [b] = engine.submit([("b", prompt_ids(2000, 3), SamplingParams(max_tokens=8))])
            for stream in (a, b):
                with pytest.raises(EngineUnhealthy, match="watchdog"):
                    async for _ in stream:
                        pass
                stream.close()
            with pytest.raises(NotAccepting, match="watchdog"):
                engine.submit([("c", [11], SamplingParams(max_tokens=1))])
        finally:
            await engine.shutdown()

    asyncio.run(run())
    assert not core.alive()
