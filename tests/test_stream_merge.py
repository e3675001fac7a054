"""A stream that fell behind its engine request catches up in one event (engine/async_engine.py
`RequestStream.next_merged`, server/app.py MERGE_QUEUED): the outputs queued behind the next one come as one,
with their tokens, text and logprobs in order; an error or an ending from outside is never merged into them."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from hybridserve.engine.async_engine import RequestStream
from hybridserve.engine.request import FinishReason, RequestOutput, TokenLogprob
from hybridserve.server import app as app_module

from test_protocol import sse_events
from tiny import async_engine, metric, synth, wait_until


def out(i: int, **kw) -> RequestOutput:
    return RequestOutput("r", [i], f"<{i}>", logprobs=[TokenLogprob(i, f"<{i}>", -i / 10)], num_output_tokens=i,
                         kv_bytes=100 * i, **kw)


class _Engine:
    def _close(self, rid: str) -> None:
        pass


def stream_of(*items) -> RequestStream:
    q: asyncio.Queue = asyncio.Queue()
    for item in items:
        q.put_nowait(item)
    return RequestStream(_Engine(), "r", q)


def test_merged_joins_a_run_of_updates():
    last = out(3, finished=True, finish_reason=FinishReason.STOP, stop_reason=7, state_bytes=5)
    run = RequestOutput.merged([out(1, state_bytes=9), out(2), last])
    assert run.new_token_ids == [1, 2, 3] and run.new_text == "<1><2><3>"
    assert [t.token_id for t in run.logprobs] == [1, 2, 3]
    assert run.finished and run.finish_reason is FinishReason.STOP and run.stop_reason == 7
    assert run.num_output_tokens == 3 and run.state_bytes == 9 and run.kv_bytes == 300 and run.error is None


def test_next_merged_takes_what_is_queued_and_ends_like_iteration():
    async def run():
        s = stream_of(out(1), out(2), out(3), out(4, finished=True, finish_reason=FinishReason.LENGTH))
        first = await s.next_merged()
        assert first.new_token_ids == [1, 2, 3, 4] and first.finished
        with pytest.raises(StopAsyncIteration):
            await s.next_merged()
        # nothing queued behind it: the output alone, without waiting for the next
        s = stream_of(out(1))
        assert (await asyncio.wait_for(s.next_merged(), 1)).new_token_ids == [1]
        # a finished output ends the merge even if something (a late abort) is queued after it
        s = stream_of(out(1), out(2, finished=True), out(3))
        assert (await s.next_merged()).new_token_ids == [1, 2]
        with pytest.raises(StopAsyncIteration):
            await s.next_merged()
    asyncio.run(run())


def test_errors_are_not_merged():
    async def run():
        failed = RuntimeError("ended from outside")
        s = stream_of(out(1), out(2), failed)
        assert (await s.next_merged()).new_token_ids == [1, 2]
        with pytest.raises(RuntimeError):
            await s.next_merged()
        with pytest.raises(StopAsyncIteration):
            await s.next_merged()
        s = stream_of(out(1), out(2, error="the engine failed"), out(3))
        assert (await s.next_merged()).new_token_ids == [1]
        second = await s.next_merged()
        assert second.new_token_ids == [2] and second.error == "the engine failed"
        # iteration (the n > 1 pump) sees the held output too
        s = stream_of(out(1), RuntimeError("x"))
        await s.next_merged()
        with pytest.raises(RuntimeError):
            await anext(s)
    asyncio.run(run())


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return async_engine(synth("llama", tmp_path_factory.mktemp("synth")))


def _held_up(read, held: list):
    """`read` (a RequestStream method) whose first call blocks the event loop until the engine is done."""
    async def late(self):
        if not held:
            held.append(1)
            time.sleep(1.0)              # the engine thread runs on; its outputs wait for the event loop
            await asyncio.sleep(0.05)    # now they are delivered, all at once
        return await read(self)
    return late


async def _behind(engine, merge: bool, body: dict, monkeypatch) -> tuple[list[dict], float]:
    """A streamed completion whose reader is held up (the event loop blocked) until the engine has finished
    the request: (its events, the ITL histogram's count after it)."""
    app = app_module.create_app(engine)
    async with app.router.lifespan_context(app):
        await wait_until(lambda: engine.health() is None)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as client:
            with monkeypatch.context() as m:
                held: list = []
                m.setattr(app_module, "MERGE_QUEUED", merge)
                m.setattr(RequestStream, "next_merged", _held_up(RequestStream.next_merged, held))
                m.setattr(RequestStream, "__anext__", _held_up(RequestStream.__anext__, held))
                r = await client.post("/v1/completions", json={"model": engine.model_name, "stream": True} | body)
            text = (await client.get("/metrics")).text
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]], sum(metric(text, "hybridserve:inter_token_latency_seconds_count"))


@pytest.mark.parametrize("logprobs", [None, 2])
def test_a_reader_behind_gets_one_event(engine, logprobs, monkeypatch):
    body = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "stream_options": {"include_usage": True}} | ({"logprobs": logprobs} if logprobs else {})
    merged, itl_merged = asyncio.run(_behind(engine, True, body, monkeypatch))
    per_token, itl_before = asyncio.run(_behind(engine, False, body, monkeypatch))
    *text_events, usage = merged
    assert len(text_events) == 1 and len(per_token) == 8 + 1          # + the usage event
    [choice] = text_events[0]["choices"]
    assert choice["text"] == "".join(e["choices"][0]["text"] for e in per_token[:-1])
    assert choice["finish_reason"] == "length" and usage["usage"]["completion_tokens"] == 8
    if logprobs:
        want = [e["choices"][0]["logprobs"] for e in per_token[:-1]]
        got = choice["logprobs"]
        assert got["tokens"] == [t for w in want for t in w["tokens"]]
        assert got["text_offset"] == [t for w in want for t in w["text_offset"]]
        assert len(got["top_logprobs"]) == 8
    # the metrics count a latency per token after the first either way (the app's registry is per app)
    assert itl_merged == itl_before == 7


def test_zero_latencies_observed_at_once_as_one_by_one():
    """A merged output of n tokens records n - 1 zero inter-token latencies in one bucket increment
    (server/metrics.py observe_zeros): the histogram's samples are those of n - 1 observe(0.0) calls."""
    from prometheus_client import CollectorRegistry, Histogram

    from hybridserve.server.metrics import ITL_BUCKETS, observe_zeros

    def samples(fill) -> list:
        registry = CollectorRegistry()
        h = Histogram("itl", "x", ["model"], buckets=ITL_BUCKETS, registry=registry).labels("m")
        h.observe(0.02)
        fill(h)
        h.observe(0.5)
        return [(s.name, s.labels, s.value) for m in registry.collect() for s in m.samples
                if not s.name.endswith("_created")]

    def one_by_one(h):
        for _ in range(7):
            h.observe(0.0)
    assert samples(lambda h: observe_zeros(h, 7)) == samples(one_by_one)
    counts = {s[1]["le"]: s[2] for s in samples(lambda h: observe_zeros(h, 7)) if s[0] == "itl_bucket"}
    assert counts[min(counts, key=float)] >= 7 and counts["+Inf"] == 9
