"""Several API processes in front of one engine process (`hybridserve serve --api-server-count N`,
server/api_servers.py, engine/api_share.py): admission bounds over all of them, each process getting only its own
requests' outputs and a departed one's requests aborted in the engine, a load round through two API processes
with /metrics summed over both, a SIGTERM drain, and the service going down with status 1 when an API process dies."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from hybridserve.engine.api_share import WIDTH, ApiShare, shared_rows
from hybridserve.engine.async_engine import AsyncEngine, NotAccepting, QueueFull
from hybridserve.engine.build import build_llm_engine
from hybridserve.engine.core_process import connect_engine, spawn_engine_process
from hybridserve.engine.gc_pauses import GcSummary
from hybridserve.engine.request import SamplingParams
from server_process import cpu_seconds, free_port, named_children as service_pids, running_server
from test_engine_process import alive, in_thread_text, one_torch_thread  # noqa: F401 (an autouse fixture)
from test_load import CLIENTS, _check_round, _round
from tiny import check_chat_stream, engine_config, metric, prompt_ids, serve_args, sse_payloads, synth


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return synth("llama", tmp_path_factory.mktemp("synth"))


def test_rows_count_every_api_process():
    rows = shared_rows(3)
    assert len(rows) == 3 * WIDTH
    views = [ApiShare(rows, i, 3) for i in range(3)]
    views[1].set_queued(2, 40)
    views[2].set_queued(1, 7)
    views[0].set_queued(5, 500)          # a process's own row is not among the others'
    assert views[0].others_queued() == (3, 47)
    assert views[1].others_queued() == (6, 507)
    for i, view in enumerate(views):
        view.set_inflight(i + 1)
    assert views[2].total_inflight() == 6
    views[1].publish(1.5, GcSummary((3, 2, 1), (0.01, 0.02, 0.25), 0.2, 1234))
    assert views[0].cpu_seconds() == {"api-0": 0.0, "api-1": 1.5, "api-2": 0.0}
    assert views[2].gc_summaries()["api-1"] == GcSummary((3, 2, 1), (0.01, 0.02, 0.25), 0.2, 1234)
    with pytest.raises(ValueError):
        ApiShare(rows, 3, 3)


def test_admission_bounds_count_the_other_processes(model):
    """An API process refuses what would take the sum over all processes past a bound, and publishes its own
    counts for the others."""
    rows = shared_rows(2)
    mine, other = ApiShare(rows, 0, 2), ApiShare(rows, 1, 2)
    config = engine_config(model, max_num_seqs=4, max_queued_requests=4, max_queued_tokens=64)
    llm, name = build_llm_engine(config)

    async def run() -> None:
        engine = AsyncEngine(llm, name, share=mine)
        await engine.start()
        try:
            params = SamplingParams(max_tokens=2, temperature=0)
            other.set_queued(3, 10)
            with pytest.raises(QueueFull, match="3 requests are waiting"):
                engine.submit([("a", prompt_ids(4), params), ("b", prompt_ids(4, 1), params)])
            other.set_queued(1, 60)
            with pytest.raises(QueueFull, match="60 prompt tokens"):
                engine.submit([("a", prompt_ids(8), params)])
            other.set_queued(0, 0)
            streams = engine.submit([("a", prompt_ids(4), params), ("b", prompt_ids(4, 1), params)])
            assert other.others_queued() == (2, 8) and other.total_inflight() == 2
            for stream in streams:
                async for _ in stream:
                    pass
                stream.close()
            assert other.others_queued() == (0, 0) and other.total_inflight() == 0
        finally:
            await engine.shutdown()

    asyncio.run(run())


def test_one_engine_process_two_api_ends(model):
    """Two API ends on one engine process: the second turns ready only once the first has warmed the engine up,
    each gets its own requests' outputs, and the requests of an end that vanishes are aborted in the engine."""
    config = engine_config(model, max_num_seqs=4)
    proc, links = spawn_engine_process(config, "warning", clients=2)
    rows = shared_rows(2)
    ids = prompt_ids(16, salt=2)
    greedy = SamplingParams(max_tokens=10, temperature=0)
    reference = in_thread_text(model, ids, greedy)

    async def text_of(engine: AsyncEngine, rid: str) -> str:
        [stream] = engine.submit([(rid, ids, greedy)])
        try:
            return "".join([o.new_text async for o in stream])
        finally:
            stream.close()

    async def run() -> None:
        cores = [connect_engine(link, proc) for link in links]
        first, second = (AsyncEngine(core, core.model_name, share=ApiShare(rows, i, 2))
                         for i, core in enumerate(cores))
        waiting = asyncio.create_task(second.start())
        await asyncio.sleep(1.0)
        assert not waiting.done() and not second.ready      # the engine is not warm yet
        await first.start()
        await asyncio.wait_for(waiting, 30)
        assert first.ready and second.ready
        try:
            texts = await asyncio.gather(text_of(first, "x"), text_of(second, "y"), text_of(second, "z"))
            assert texts[0] == texts[1] == texts[2] == reference

            # the second end starts a long request and then vanishes without a word (its process died)
            long = SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True)
            [stream] = second.submit([("long", ids, long)])
            assert (await stream.__anext__()).new_token_ids
            cores[1].detach()
            cores[1]._commands.close()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                s = first.stats()
                if s.num_running == 0 and s.kv_pages_used == 0:
                    break
            assert (s.num_running, s.kv_pages_used) == (0, 0)
            assert await text_of(first, "after") == texts[0]   # the engine serves on
        finally:
            await first.shutdown()
        proc.join(20)
        assert proc.exitcode == 0      # every end gone: the engine process ends

    asyncio.run(run())


def test_load_round_through_two_api_processes(model):
    """test_load's round (200 streaming clients, a fifth leaving mid-stream) against two API processes: both
    serve part of it, nothing is held afterwards, and any scrape reports the sums over both processes."""
    args = serve_args(model, "--api-server-count", "2", "--max-num-seqs", "64", "--max-queued-requests", "512",
                      "--kv-cache-memory", "64MiB")
    with running_server(*args) as (url, proc):
        pids = service_pids(proc.pid)
        assert set(pids) == {"hs-engine", "hs-api-0", "hs-api-1"}
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        _check_round(url, asyncio.run(_round(url, 3)))
        used = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
        assert used["hs-api-0"] > 0.1 and used["hs-api-1"] > 0.1, used    # both took connections
        # ten more requests, a connection each (either process may take one): every scrape counts all ten
        finished = sum(metric(httpx.get(f"{url}/metrics").text, "hybridserve:e2e_request_latency_seconds_count"))
        assert CLIENTS * 0.75 <= finished <= CLIENTS    # the clients that left at once may not have been submitted
        for i in range(10):
            body = {"model": "llama", "prompt": prompt_ids(6, i), "max_tokens": 3}
            assert httpx.post(f"{url}/v1/completions", json=body).status_code == 200
        scrapes = [httpx.get(f"{url}/metrics").text for _ in range(6)]
        for text in scrapes:
            assert sum(metric(text, "hybridserve:e2e_request_latency_seconds_count")) == finished + 10
            assert sum(metric(text, "hybridserve:request_success_total", 'finished_reason="length"')) >= 10
            for process in ("api-0", "api-1", "engine"):
                assert metric(text, "hybridserve:process_cpu_seconds_total", f'process="{process}"')[0] > 0
            assert metric(text, "hybridserve:gc_frozen_objects", 'process="api-1"')[0] > 10_000
            assert sum(metric(text, "hybridserve:event_loop_lag_seconds_count")) > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert not any(alive(pid) for pid in pids.values())


def test_sigterm_drains_every_api_process(model):
    """The launcher hands SIGTERM on: streams in flight in either API process finish, then all exit with 0; a
    signal to every process of the service (the API processes ignore their own) counts once."""
    args = serve_args(model, "--api-server-count", "2", "--max-num-seqs", "8")

    async def streams_through_sigterm(url: str, pids: list[int]) -> list[list[str]]:
        streaming = []     # streams that have had their first chunk: the signal goes once all six are in flight

        async def one(http: httpx.AsyncClient, name: str) -> list[str]:
            body = {"model": name, "messages": [{"role": "user", "content": "Tell me a story."}],
                    "max_tokens": 150, "ignore_eos": True, "stream": True}
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                text = ""
                async for chunk in r.aiter_text():
                    if not text and chunk:
                        streaming.append(name)
                        if len(streaming) == len(clients):
                            for pid in pids:
                                os.kill(pid, signal.SIGTERM)
                    text += chunk
            return sse_payloads(text)

        clients = [httpx.AsyncClient(base_url=url, timeout=60) for _ in range(6)]   # a connection each
        try:
            name = (await clients[0].get("/v1/models")).json()["data"][0]["id"]
            return await asyncio.gather(*[one(c, name) for c in clients])
        finally:
            for c in clients:
                await c.aclose()

    with running_server(*args) as (url, proc):
        pids = service_pids(proc.pid)
        outcomes = asyncio.run(streams_through_sigterm(url, [proc.pid, *pids.values()]))
        assert all(check_chat_stream(events) == "finished" for events in outcomes)
        assert proc.wait(timeout=60) == 0
    assert not any(alive(pid) for pid in pids.values())


def test_an_api_process_that_dies_takes_the_service_down(model):
    """An API process killed: the others drain and exit, the engine process ends, and the launcher exits with 1
    for the orchestrator to restart the service."""
    args = serve_args(model, "--api-server-count", "2", "--max-num-seqs", "4")
    with running_server(*args) as (url, proc):
        pids = service_pids(proc.pid)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        name = client.models.list().data[0].id
        assert client.completions.create(model=name, prompt=prompt_ids(8), max_tokens=4).usage.completion_tokens == 4
        os.kill(pids["hs-api-1"], signal.SIGKILL)
        assert proc.wait(timeout=60) == 1
    assert not any(alive(pid) for pid in pids.values())


def test_engine_process_death_turns_every_api_end_unhealthy(model):
    """The engine process killed: each API end reports it (503 for good, for the orchestrator to restart the
    service)."""
    proc, links = spawn_engine_process(engine_config(model, max_num_seqs=4), "warning", clients=2)
    rows = shared_rows(2)

    async def run() -> None:
        cores = [connect_engine(link, proc) for link in links]
        engines = [AsyncEngine(core, core.model_name, share=ApiShare(rows, i, 2)) for i, core in enumerate(cores)]
        await asyncio.gather(*(e.start() for e in engines))
        try:
            assert all(e.health() is None for e in engines)
            os.kill(proc.pid, signal.SIGKILL)
            deadline = time.monotonic() + 20
            while any(e.health() is None for e in engines) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            for e in engines:
                assert "engine process exited" in e.health()
                with pytest.raises(NotAccepting):
                    e.submit([("late", prompt_ids(4), SamplingParams(max_tokens=2))])
        finally:
            for e in engines:
                await e.shutdown()

    asyncio.run(run())


def test_engine_process_death_keeps_the_service_up_unhealthy(model):
    """Served: after the engine process is killed, /health answers 503 on every new connection (either API process
    may take it) while the API processes stay up; a SIGTERM still drains them and exits with 0."""
    args = serve_args(model, "--api-server-count", "2", "--max-num-seqs", "4")
    with running_server(*args) as (url, proc):
        pids = service_pids(proc.pid)
        os.kill(pids["hs-engine"], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while httpx.get(f"{url}/health").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)    # both API processes have read the end of their pipes
        answers = [httpx.get(f"{url}/health") for _ in range(12)]    # a connection each
        assert all(r.status_code == 503 and "engine process exited" in r.text for r in answers)
        assert alive(pids["hs-api-0"]) and alive(pids["hs-api-1"])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert not any(alive(pid) for pid in pids.values())


def test_refused_and_failed_starts(model, tmp_path):
    """More API processes without the engine process is refused; an engine that cannot be built fails every API
    process's start, and the service exits with status 1 (nothing left running)."""
    def serve(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "hybridserve.server.cli", "serve", "--port", str(free_port()),
                               *args], capture_output=True, text=True, timeout=120)

    done = serve(*serve_args(model, "--api-server-count", "2", "--no-engine-process"))
    assert done.returncode != 0 and "needs the engine process" in done.stderr
    done = serve(*serve_args(tmp_path / "missing", "--api-server-count", "2", "--log-level", "info"))
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Startup failed" in done.stderr or "startup failed" in done.stderr
    with socket.socket() as taken:    # the port is someone else's
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = subprocess.run([sys.executable, "-m", "hybridserve.server.cli", "serve", "--port",
                               str(taken.getsockname()[1]), *serve_args(model, "--api-server-count", "2")],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "cannot listen" in done.stderr
