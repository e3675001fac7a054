"""AsyncEngine's guards over a real tiny model, in-process: admission bounds, deadlines, the step watchdog,
draining, warm-up. No fakes: every request runs through the real engine thread and model."""
from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import httpx
import pytest

from hybridserve.engine.async_engine import (
    AsyncEngine,
    EngineUnhealthy,
    NotAccepting,
    QueueFull,
    RequestTimedOut,
    ShuttingDown,
    effective_timeout,
    step_overdue,
)
from hybridserve.engine.build import build_llm_engine
from hybridserve.engine.request import SamplingParams
from hybridserve.server.app import create_app

from tiny import engine_config, prompt_ids, synth, time_step, wait_until

LONG = SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """One engine core for the module; each test wraps it in a fresh AsyncEngine with its own limits."""
    model = synth("llama", tmp_path_factory.mktemp("synth"))
    engine, name = build_llm_engine(engine_config(model, max_num_seqs=2, max_model_len=2048,
                                                  max_num_batched_tokens=2048, kv_cache_memory=32 << 20))
    engine.served_name = name
    return engine


def make(llm, **limits) -> AsyncEngine:
    llm.config = replace(engine_config(llm.config.model, max_num_seqs=2), **limits)
    return AsyncEngine(llm, llm.served_name)


def idle(engine: AsyncEngine) -> bool:
    s = engine.stats()
    return s.num_running == 0 and s.num_waiting == 0 and s.kv_pages_used == 0


# ---- pure decisions --------------------------------------------------------------------------------------


def test_step_overdue():
    assert not step_overdue(None, 100.0, 1.0)        # no step running
    assert not step_overdue(99.5, 100.0, 1.0)        # running, within the limit
    assert step_overdue(98.9, 100.0, 1.0)            # running too long
    assert not step_overdue(0.0, 100.0, 0)           # watchdog off


def test_effective_timeout():
    assert effective_timeout(None, 0) is None
    assert effective_timeout(5, 0) == 5              # no server limit: the request's own
    assert effective_timeout(None, 30) == 30
    assert effective_timeout(100, 30) == 30          # a request cannot extend the server's limit
    assert effective_timeout(2, 30) == 2


# ---- admission --------------------------------------------------------------------------------------------


def test_not_accepting_before_start_and_ready_after_warm_up(llm):
    async def run():
        engine = make(llm)
        assert engine.health() is not None
        with pytest.raises(NotAccepting):
            engine.submit([("early", [11], SamplingParams(max_tokens=1))])
        await engine.start()
        try:
            assert engine.health() is None and engine.ready
            assert engine.stats().num_running == 0   # the warm-up request is gone
        finally:
            await engine.shutdown()

    asyncio.run(run())


def test_shapes_warm_up_serves_its_waves_and_returns_everything(tmp_path):
    """The shapes warm-up (what CUDA starts run) on the CPU engine: several waves, the later arriving while the
    earlier decode, a prompt over the step budget, the eager sampler's paths. It ends ready with every page and
    slot back and no request left, and the engine serves normally after it."""
    async def run():
        llm, name = build_llm_engine(engine_config(synth("llama", tmp_path), max_num_seqs=8, max_model_len=2048,
                                                   max_num_batched_tokens=256, warmup="shapes"))
        engine = AsyncEngine(llm, name)
        assert engine.warmup_mode == "shapes"
        steps = []
        original = llm.runner.run
        llm.runner.run = lambda chunks, *a, **k: steps.append([len(c.tokens) for c in chunks]) or original(
            chunks, *a, **k)
        try:
            await engine.start()
        finally:
            llm.runner.run = original
        try:
            assert engine.ready and idle(engine) and engine.num_inflight == 0
            assert all(g.used == 0 for g in engine.stats().state_groups.values())
            # prompts prefilled together, a decode step beside a prompt chunk, and a full-budget chunk
            assert any(sum(n > 1 for n in s) >= 2 for s in steps)
            assert any(1 in s and any(n > 1 for n in s) for s in steps)
            assert any(sum(s) == 256 and max(s) > 200 for s in steps)
            outs = [o async for o in engine.generate("after", prompt_ids(5, 1), SamplingParams(max_tokens=3))]
            assert sum(len(o.new_token_ids) for o in outs) == 3
        finally:
            await engine.shutdown()

    asyncio.run(run())


def test_warm_up_modes():
    from hybridserve.engine.warmup import resolve as resolve_warmup
    assert resolve_warmup("auto", "cuda") == "shapes" and resolve_warmup("auto", "cpu") == "basic"
    assert resolve_warmup("basic", "cuda") == "basic"
    with pytest.raises(ValueError, match="unknown warm-up"):
        resolve_warmup("everything", "cpu")


def test_request_bound_is_exact_under_a_burst(llm):
    """Ten submissions within one event-loop turn, bound 4: exactly 4 admitted, whatever the engine thread does
    meanwhile (its reports only land when the loop runs)."""
    async def run():
        engine = make(llm, max_queued_requests=4)
        await engine.start()
        try:
            accepted, refused = [], 0
            for i in range(10):
                try:
                    accepted += engine.submit([(f"r{i}", prompt_ids(8, i), SamplingParams(max_tokens=2))])
                except QueueFull:
                    refused += 1
            assert (len(accepted), refused) == (4, 6)
            assert engine.num_queued == (4, 32)
            for stream in accepted:
                outs = [o async for o in stream]
                stream.close()
                assert outs[-1].finished
            assert engine.num_queued == (0, 0) and engine.num_inflight == 0
            # all-or-nothing: n choices that cannot all fit are refused together
            with pytest.raises(ValueError, match="queues at most 4"):
                engine.submit([(f"n{i}", [11], SamplingParams(max_tokens=1)) for i in range(5)])
            assert engine.num_queued == (0, 0)
        finally:
            await engine.shutdown()

    asyncio.run(run())


def test_token_bound_and_a_long_prompt_alone(llm):
    async def run():
        engine = make(llm, max_queued_tokens=250)
        await engine.start()
        try:
            first = engine.submit([("a", prompt_ids(100), LONG), ("b", prompt_ids(100, 1), LONG)])
            with pytest.raises(QueueFull, match="prompt tokens"):
                engine.submit([("c", prompt_ids(100, 2), LONG)])
            for stream in first:
                stream.close()   # aborts: frees the queue share at once
            assert engine.num_queued == (0, 0)
            alone = engine.submit([("d", prompt_ids(600), SamplingParams(max_tokens=1))])  # > bound, queue empty
            assert [o async for o in alone[0]][-1].finished
            alone[0].close()
            await wait_until(lambda: idle(engine))
        finally:
            await engine.shutdown()

    asyncio.run(run())


def test_queue_share_is_freed_when_a_request_starts_running(llm):
    """max_num_seqs 2, queue bound 2: two long requests start running and leave the queue, two more wait in
    it, a fifth is refused."""
    async def run():
        engine = make(llm, max_queued_requests=2)
        await engine.start()
        try:
            running = engine.submit([("a", prompt_ids(8), LONG), ("b", prompt_ids(8, 1), LONG)])
            await wait_until(lambda: engine.num_queued == (0, 0))
            assert engine.stats().num_running == 2
            waiting = engine.submit([("c", prompt_ids(8, 2), LONG)]) + engine.submit([("d", prompt_ids(8, 3), LONG)])
            await asyncio.sleep(0.2)   # several engine steps: c and d stay queued, no slot is free
            assert engine.num_queued == (2, 16) and engine.stats().num_waiting == 2
            with pytest.raises(QueueFull):
                engine.submit([("e", prompt_ids(8, 4), LONG)])
            for stream in running + waiting:
                stream.close()
            await wait_until(lambda: idle(engine))
            assert engine.num_queued == (0, 0) and engine.num_inflight == 0
        finally:
            await engine.shutdown()

    asyncio.run(run())


# ---- deadlines --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("server_default, requested", [(0, 0.3), (0.3, 100)])
def test_deadline_ends_the_request_and_frees_it(llm, server_default, requested):
    async def run():
        engine = make(llm, request_timeout=server_default)
        await engine.start()
        try:
            [stream] = engine.submit([("slow", prompt_ids(8), LONG)], timeout=requested)
            loop = asyncio.get_running_loop()
            start, outputs = loop.time(), 0
            with pytest.raises(RequestTimedOut, match="timeout"):
                async for _ in stream:
                    outputs += 1
            assert 0.25 < loop.time() - start < 2 and outputs > 0
            stream.close()
            await wait_until(lambda: idle(engine), timeout=2)
        finally:
            await engine.shutdown()

    asyncio.run(run())


# ---- draining ---------------------------------------------------------------------------------------------


def test_drain_finishes_short_requests_and_cuts_long_ones(llm):
    async def run():
        engine = make(llm)
        await engine.start()
        try:
            [short] = engine.submit([("short", prompt_ids(8), SamplingParams(max_tokens=3, ignore_eos=True))])
            [long] = engine.submit([("long", prompt_ids(8, 1), LONG)])

            async def consume(stream):
                try:
                    return [o async for o in stream]
                except ShuttingDown as exc:
                    return exc
                finally:
                    stream.close()

            results = asyncio.gather(consume(short), consume(long))
            cut = await engine.drain(timeout=0.5)
            short_outs, long_result = await results
            assert cut == 1
            assert short_outs[-1].finished and short_outs[-1].finish_reason.value == "length"
            assert isinstance(long_result, ShuttingDown)
            assert engine.health() == "The server is shutting down."
            with pytest.raises(NotAccepting):
                engine.submit([("late", [11], SamplingParams(max_tokens=1))])
            await wait_until(lambda: idle(engine))
        finally:
            await engine.shutdown()

    asyncio.run(run())


# ---- the step watchdog, with a real slow step ---------------------------------------------------------------


@pytest.fixture(scope="module")
def watchdog_timeout(llm):
    """A watchdog timeout that a real 2,000-token prefill step exceeds and a decode step never reaches.

    Both steps are timed on this machine first, so the test does not depend on CPU speed: the timeout is a
    third of the slow step, and must still be at least 5x the fast one (on a 2-core CPU the ratio is ~50)."""
    llm.config = engine_config(llm.config.model, max_num_seqs=2)
    time_step(llm, 1)
    fast = max(time_step(llm, 1) for _ in range(3))
    slow = min(time_step(llm, 2000) for _ in range(2))
    if slow / 3 < 5 * fast:
        pytest.skip(f"this machine prefills too fast to make a slow step: {slow:.3f}s vs {fast:.3f}s")
    return slow / 3


def test_watchdog_trips_on_a_real_slow_step(llm, watchdog_timeout):
    async def run():
        engine = make(llm, watchdog_timeout=watchdog_timeout)
        await engine.start()
        try:
            [a] = engine.submit([("a", prompt_ids(8), LONG)])
            assert (await a.__anext__()).new_token_ids     # decoding, well within the watchdog
            [b] = engine.submit([("b", prompt_ids(2000, 3), SamplingParams(max_tokens=8))])  # one 2,000-token step
            for stream in (a, b):
                with pytest.raises(EngineUnhealthy, match="watchdog"):
                    async for _ in stream:
                        pass
                stream.close()
            assert "watchdog" in engine.health()
            with pytest.raises(NotAccepting, match="watchdog"):
                engine.submit([("c", [11], SamplingParams(max_tokens=1))])
            await wait_until(lambda: not engine.core.alive(), timeout=30)  # the step ends, the thread stops
            assert "watchdog" in engine.health()  # and /health stays 503: a restart is the only way back
            assert idle(engine)
        finally:
            await engine.shutdown()

    asyncio.run(run())


def test_watchdog_errors_reach_http_clients(llm, watchdog_timeout):
    """Through the app: the stream that was generating gets an in-band error and [DONE]; a non-streaming
    request gets a 500 body; /health turns 503."""
    async def run():
        engine = make(llm, watchdog_timeout=watchdog_timeout)
        app = create_app(engine)
        async with app.router.lifespan_context(app):
            await wait_until(lambda: engine.health() is None)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as client:
                base = {"model": engine.model_name, "max_tokens": 1500, "ignore_eos": True}
                streaming = asyncio.create_task(client.post("/v1/completions", json=base | {
                    "prompt": prompt_ids(8), "stream": True}))
                await wait_until(lambda: engine.stats().num_running == 1)
                await asyncio.sleep(0.1)
                blocking = await client.post("/v1/completions", json=base | {"prompt": prompt_ids(2000, 3),
                                                                             "max_tokens": 8})
                assert blocking.status_code == 500, blocking.text
                assert "watchdog" in blocking.json()["error"]["message"]
                r = await streaming
                events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
                assert r.status_code == 200 and events[-1] == "[DONE]"
                assert "watchdog" in json.loads(events[-2])["error"]["message"]
                assert all("choices" in json.loads(e) for e in events[:-2])
                health = await client.get("/health")
                assert health.status_code == 503 and "watchdog" in health.json()["error"]["message"]
                refused = await client.post("/v1/completions", json=base | {"prompt": [11], "max_tokens": 1})
                assert refused.status_code == 503 and refused.headers["retry-after"]

    asyncio.run(run())
