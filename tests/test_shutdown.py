"""Graceful shutdown of a real server process on SIGTERM: readiness drops at once, new requests get 503,
in-flight streams finish (or, past --shutdown-timeout, end with an in-band error and [DONE]), exit status 0."""
from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest

from server_process import running_server
from tiny import check_chat_stream, serve_args, sse_payloads, synth

MESSAGES = [{"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return synth("llama", tmp_path_factory.mktemp("synth"))


async def _shutdown_scenario(url: str, proc, max_tokens: int) -> dict:
    """Three streams and one non-streaming request in flight, then SIGTERM. Returns what every client saw."""
    limits = httpx.Limits(max_connections=10)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as clients, \
            httpx.AsyncClient(base_url=url, timeout=10) as probe:
        name = (await probe.get("/v1/models")).json()["data"][0]["id"]
        body = {"model": name, "messages": MESSAGES, "max_tokens": max_tokens, "ignore_eos": True}
        started = asyncio.Event()
        streaming: set[int] = set()

        async def stream(i: int) -> list[str]:
            async with clients.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as r:
                assert r.status_code == 200
                text = ""
                async for chunk in r.aiter_text():
                    text += chunk
                    if text.count("\n\n") >= 2:   # the role chunk and a first content chunk: generating
                        streaming.add(i)
                        if len(streaming) == 3:
                            started.set()
                return sse_payloads(text)

        tasks = [asyncio.create_task(stream(i)) for i in range(3)]
        blocking = asyncio.create_task(clients.post("/v1/chat/completions", json=body))
        await asyncio.wait_for(started.wait(), 30)
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.05)
        health = await probe.get("/health")
        refused = await probe.post("/v1/chat/completions", json=body | {"max_tokens": 1})
        streams = await asyncio.gather(*tasks)
        return {"health": health, "refused": refused, "streams": streams, "blocking": await blocking}


def _wait_exit(proc, timeout: float) -> tuple[int, float]:
    start = time.monotonic()
    code = proc.wait(timeout=timeout)
    return code, time.monotonic() - start


def _assert_refused(seen: dict) -> None:
    health, refused = seen["health"], seen["refused"]
    assert health.status_code == 503 and "shutting down" in health.json()["error"]["message"]
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert set(refused.json()["error"]) == {"message", "type", "param", "code"}


def test_sigterm_drains_in_flight_requests(model):
    with running_server(*serve_args(model, "--shutdown-timeout", "30")) as (url, proc):
        seen = asyncio.run(_shutdown_scenario(url, proc, max_tokens=100))
        code, _ = _wait_exit(proc, 30)
    _assert_refused(seen)
    assert [check_chat_stream(events) for events in seen["streams"]] == ["finished"] * 3
    assert all(len(events) > 50 for events in seen["streams"])   # they ran to their end, not cut
    assert seen["blocking"].status_code == 200
    assert seen["blocking"].json()["choices"][0]["finish_reason"] == "length"
    assert code == 0


def test_shutdown_timeout_cuts_long_requests_off_cleanly(model):
    with running_server(*serve_args(model, "--shutdown-timeout", "1")) as (url, proc):
        start = time.monotonic()
        seen = asyncio.run(_shutdown_scenario(url, proc, max_tokens=1500))
        code, _ = _wait_exit(proc, 30)
        elapsed = time.monotonic() - start
    _assert_refused(seen)
    assert [check_chat_stream(events, cut_off_ok=True) for events in seen["streams"]] == ["shutting_down"] * 3
    blocking = seen["blocking"]
    assert blocking.status_code == 503 and blocking.json()["error"]["code"] == "shutting_down"
    assert code == 0
    assert elapsed < 20  # 1 s of drain, not 1,500 tokens of generation
