"""The OpenAI-compatible HTTP front end: validate, template, tokenize, submit to the engine, stream back.

The app never touches tensors. One prompt with n choices becomes n engine requests (`<id>-<index>`) whose
outputs are merged; every path out of a handler (finish, error, deadline, shutdown, client disconnect)
closes the engine streams, which aborts the unfinished requests and frees their state slots and KV pages.
Everything that can refuse a request (validation, admission, readiness) runs before a response starts, so a
refusal is a real status code; only failures after a stream's 200 are reported in-band.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from typing import TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from hybridserve.engine.async_engine import (
    AsyncEngine,
    EngineUnhealthy,
    NotAccepting,
    QueueFull,
    RequestStream,
    RequestTimedOut,
    ShuttingDown,
)
from hybridserve.engine.request import RequestOutput, SamplingParams, TokenLogprob
from hybridserve.server.errors import (
    APIError,
    context_length_exceeded,
    engine_error,
    install_error_handlers,
    invalid_request,
    model_not_found,
    not_ready,
    overloaded,
    request_timeout,
    shutting_down,
)
from hybridserve.server.guard import RequestGuard
from hybridserve.server.metrics import ServerMetrics
from hybridserve.server.sse import TextEvents
from hybridserve.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatStreamChoice,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    SamplingRequest,
    TopLogprob,
    Usage,
    UsageMemory,
)

logger = logging.getLogger(__name__)

try:
    VERSION = version("hybridserve")
except PackageNotFoundError:      # run from a source tree on the path, not installed
    VERSION = "0+source"
SYSTEM_FINGERPRINT = f"hybridserve-{VERSION}"
SSE_DONE = "data: [DONE]\n\n"
# Text-only stream events from a template (server/sse.py) instead of a pydantic model each; an A/B knob
# for bench/serve_host_cost.py
FAST_TEXT_EVENTS = True
# A one-choice response reads its engine stream directly rather than through a pump task and a merged
# queue (one task switch less per token); an A/B knob for bench/serve_host_cost.py
DIRECT_SINGLE_STREAM = True
# A one-choice stream that fell behind its engine request (outputs of several steps queued when the event loop
# comes back to it: many streams at once) sends them as one event, not one event per token.
# HYBRIDSERVE_STREAM_MERGE=0 turns it off (bench/serve_latency.py --merge compares).
MERGE_QUEUED = os.environ.get("HYBRIDSERVE_STREAM_MERGE", "1") != "0"
MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps the same way
DEFAULT_MAX_REQUEST_BYTES = 1 << 20
MAX_GENERATIONS = 64    # prompts x n in one request: each is an engine request holding a slot and pages
T = TypeVar("T")


class EngineFailure(Exception):
    """An accepted request failed after submission; carries what the client is told (as the HTTP response,
    or in-band once a stream's 200 has gone out)."""

    def __init__(self, error: APIError, reason: str) -> None:
        super().__init__(error.message)
        self.error = error
        self.reason = reason  # for the failure metric


def _failure(job_id: str, item: Exception) -> EngineFailure:
    """Map what a request stream raised to the client's error."""
    if isinstance(item, RequestTimedOut):
        return EngineFailure(request_timeout(str(item)), "timeout")
    if isinstance(item, ShuttingDown):
        return EngineFailure(shutting_down(str(item)), "shutdown")
    if isinstance(item, EngineUnhealthy):
        return EngineFailure(engine_error(str(item)), "unhealthy")
    if isinstance(item, ValueError):  # the engine refused it on add: the client's error
        return EngineFailure(invalid_request(str(item)), "invalid")
    logger.error("engine request %s failed", job_id, exc_info=item)
    return EngineFailure(engine_error(f"The engine failed: {type(item).__name__}: {item}"), "engine_error")


@dataclass
class _Job:
    """One engine request: one choice of one prompt."""

    index: int            # the choice index in the response
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class _Choice:
    """What one engine request has produced so far."""

    text: list[str] = field(default_factory=list)
    text_len: int = 0
    num_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    state_bytes: int = 0
    kv_bytes: int = 0

    def add(self, out: RequestOutput) -> None:
        self.text.append(out.new_text)
        self.text_len += len(out.new_text)
        self.num_tokens += len(out.new_token_ids)
        self.logprobs.extend(out.logprobs)
        # KV grows with the sequence and may be reported as 0 once pages are freed: keep the peak.
        self.state_bytes = max(self.state_bytes, out.state_bytes)
        self.kv_bytes = max(self.kv_bytes, out.kv_bytes)
        if out.finished:
            self.finish_reason = _finish_reason(out)
            self.stop_reason = out.stop_reason


def _finish_reason(out: RequestOutput) -> str | None:
    if not out.finished:
        return None
    return out.finish_reason.value if out.finish_reason is not None else "stop"


Render = Callable[[_Job, RequestOutput, _Choice], "str | None"]


def _sse(payload: str) -> str:
    return f"data: {payload}\n\n"


def _text_only(out: RequestOutput, want_logprobs: bool) -> bool:
    """An output whose event carries nothing but new text (no logprobs, not the last)."""
    return FAST_TEXT_EVENTS and bool(out.new_text) and not out.finished and not want_logprobs \
        and out.stop_reason is None


def _finite(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def _chat_logprobs(items: list[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(content=[
        ChatTokenLogprob(
            token=t.token, logprob=_finite(t.logprob), bytes=list(t.token.encode()),
            top_logprobs=[TopLogprob(token=s, logprob=_finite(lp), bytes=list(s.encode())) for _, s, lp in t.top],
        )
        for t in items
    ])


def _completion_logprobs(items: list[TokenLogprob], text_offset: int) -> CompletionLogprobs:
    """Legacy format. As in OpenAI's, each top_logprobs entry also holds the sampled token."""
    result = CompletionLogprobs()
    for t in items:
        result.tokens.append(t.token)
        result.token_logprobs.append(_finite(t.logprob))
        result.top_logprobs.append({t.token: _finite(t.logprob)} | {s: _finite(lp) for _, s, lp in t.top})
        result.text_offset.append(text_offset)
        text_offset += len(t.token)
    return result


def _usage(prompt_lens: list[int], choices: list[_Choice]) -> Usage:
    prompt, completion = sum(prompt_lens), sum(c.num_tokens for c in choices)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
        memory=UsageMemory(state_bytes=sum(c.state_bytes for c in choices), kv_bytes=sum(c.kv_bytes for c in choices)),
    )


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Run a non-streaming handler's work, cancelling it (and so aborting its engine requests) if the client
    goes away first. Listening for `http.disconnect` is what vLLM does; `is_disconnected()` polling can miss it."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return None if task.cancelled() else task.result()


def _close_all(streams: list[RequestStream]) -> None:
    for stream in streams:
        stream.close()


class _SSEResponse(StreamingResponse):
    """Closes its generator and the engine streams on every exit path, so a disconnect aborts the engine
    requests at once rather than whenever the abandoned generator is garbage-collected (and a generator that
    never started, whose own `finally` never runs, still releases them)."""

    def __init__(self, content: AsyncIterator[str], streams: list[RequestStream]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.streams = streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            _close_all(self.streams)
            await self.body_iterator.aclose()  # type: ignore[union-attr]


class _Serving:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.metrics = ServerMetrics(engine)
        self.created = int(time.time())

    # ---- shared steps ------------------------------------------------------------------------------------

    def _check(self, req: SamplingRequest) -> None:
        if req.model != self.engine.model_name:
            raise model_not_found(req.model)
        reason = self.engine.health()
        if reason is not None:
            self.metrics.rejected("not_serving")
            raise not_ready(reason, retry_after=1 if self.engine.draining else 5)
        if req.model_extra:
            logger.warning("ignoring unsupported request fields: %s", ", ".join(sorted(req.model_extra)))

    def _check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = self.engine.tokenizer.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise invalid_request(f"{param}: token id {bad} is outside the vocabulary (0..{vocab - 1})", param)

    def _jobs(self, rid: str, prompts: list[list[int]], req: SamplingRequest, where: str) -> list[_Job]:
        """Validate lengths against the context window (the engine does not) and fan out the n choices."""
        max_len = self.engine.max_model_len
        if req.stop_token_ids:
            self._check_token_ids(req.stop_token_ids, "stop_token_ids")
        n = req.num_choices
        jobs = []
        for p, ids in enumerate(prompts):
            if not ids:
                raise invalid_request(f"The {where} is empty.", where)
            requested = req.requested_max_tokens
            room = max_len - len(ids)
            if (requested or 1) > room:
                raise context_length_exceeded(max_len, len(ids), requested or 1, where)
            params = req.sampling_params(requested or room, self.engine.sampling_defaults)
            if params.min_tokens > params.max_tokens:
                raise invalid_request(
                    f"min_tokens ({params.min_tokens}) must not exceed max_tokens ({params.max_tokens})", "min_tokens")
            try:
                self.engine.validate(ids, params)
            except ValueError as exc:
                raise invalid_request(str(exc), where) from exc
            for i in range(n):
                seed = None if params.seed is None else params.seed + i
                index = p * n + i
                jobs.append(_Job(index, f"{rid}-{index}", ids, replace(params, seed=seed)))
        return jobs

    def _submit(self, jobs: list[_Job], timeout: float | None) -> list[RequestStream]:
        """Admission happens here, before any response starts: a full queue or a draining server is a real
        503 with Retry-After, never an in-band stream error."""
        try:
            return self.engine.submit([(j.request_id, j.prompt_ids, j.params) for j in jobs], timeout=timeout)
        except QueueFull as exc:
            self.metrics.rejected("queue_full")
            raise overloaded(str(exc), exc.retry_after) from exc
        except NotAccepting as exc:
            self.metrics.rejected("not_serving")
            raise not_ready(str(exc), 1 if self.engine.draining else exc.retry_after) from exc
        except ValueError as exc:
            raise invalid_request(str(exc)) from exc

    async def _outputs(self, jobs: list[_Job], streams: list[RequestStream]
                       ) -> AsyncIterator[tuple[_Job, RequestOutput]]:
        """Merge the engine streams of all jobs (one job: its stream, read directly). Closing this generator
        closes the engine streams, which aborts whatever has not finished."""
        trackers = {job.index: self.metrics.track(len(job.prompt_ids)) for job in jobs}

        def checked(job: _Job, item: RequestOutput | Exception) -> RequestOutput:
            """The output, observed; an ended stream or an engine error raised as the client's failure."""
            if isinstance(item, Exception):
                failure = _failure(job.request_id, item)
                self.metrics.failed(failure.reason)
                raise failure from item
            trackers[job.index].observe(item)
            if item.error is not None:
                self.metrics.failed("engine_error")
                raise EngineFailure(engine_error(item.error), "engine_error")
            return item

        if len(jobs) == 1 and DIRECT_SINGLE_STREAM:     # one choice: its stream read here, no pump task
            job, stream = jobs[0], streams[0]
            try:
                while True:
                    try:
                        out = await (stream.next_merged() if MERGE_QUEUED else anext(stream))
                    except StopAsyncIteration:
                        return
                    except Exception as exc:
                        checked(job, exc)
                    yield job, checked(job, out)
            finally:
                _close_all(streams)
                trackers[job.index].finish("abort")  # no-op if it finished
        queue: asyncio.Queue[tuple[_Job, RequestOutput | Exception | None]] = asyncio.Queue()

        async def pump(job: _Job, stream: RequestStream) -> None:
            try:
                async for out in stream:
                    queue.put_nowait((job, out))
            except Exception as exc:  # handed to the consumer, which reports it to the client
                queue.put_nowait((job, exc))
            finally:
                queue.put_nowait((job, None))

        tasks = [asyncio.create_task(pump(job, stream)) for job, stream in zip(jobs, streams)]
        try:
            running = len(jobs)
            while running:
                job, item = await queue.get()
                if item is None:
                    running -= 1
                    continue
                yield job, checked(job, item)
        finally:
            # Nothing before the await may be skipped: inside Starlette's cancelled task group (a streaming
            # client that disconnected) every await raises CancelledError again at once. Closing the streams
            # is synchronous and aborts the engine requests; awaiting the pumps only makes the normal path tidy.
            _close_all(streams)
            for tracker in trackers.values():
                tracker.finish("abort")  # no-op for the ones that finished
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _collect(self, jobs: list[_Job], streams: list[RequestStream]) -> dict[int, _Choice]:
        choices = {job.index: _Choice() for job in jobs}
        try:
            async with aclosing(self._outputs(jobs, streams)) as outputs:
                async for job, out in outputs:
                    choices[job.index].add(out)
        except EngineFailure as exc:
            raise exc.error from exc
        return choices

    async def _complete(self, request: Request, jobs: list[_Job], streams: list[RequestStream]
                        ) -> dict[int, _Choice] | None:
        """A non-streaming response's choices, or None if the client went away first."""
        try:
            return await _unless_disconnected(request, self._collect(jobs, streams))
        finally:
            _close_all(streams)  # also when the collecting task was cancelled before it ever ran

    async def _stream(self, jobs: list[_Job], streams: list[RequestStream], render: Render, first: list[str],
                      usage_event: Callable[[list[_Choice]], str] | None) -> AsyncIterator[str]:
        """SSE body: `first` events, one event per engine output (`render(job, out, choice so far)` returns an
        event or None to skip), the usage event if asked for, then `[DONE]`. After the 200 has gone out,
        errors can only be reported in-band."""
        choices = {job.index: _Choice() for job in jobs}
        try:
            for event in first:
                yield event
            async with aclosing(self._outputs(jobs, streams)) as outputs:
                async for job, out in outputs:
                    event = render(job, out, choices[job.index])
                    choices[job.index].add(out)
                    if event is not None:
                        yield event
            if usage_event is not None:
                yield usage_event(list(choices.values()))
        except EngineFailure as exc:
            yield _sse(json.dumps(exc.error.body()))
        except Exception as exc:
            logger.exception("streaming response failed")
            yield _sse(json.dumps(engine_error(f"Internal server error: {type(exc).__name__}: {exc}").body()))
        yield SSE_DONE

    # ---- endpoints ---------------------------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        self._check(req)
        messages = [
            {"role": m.role, "content": m.text} | ({"name": m.name} if m.name else {}) for m in req.messages
        ]
        try:
            # Templates and tokenization of long prompts are CPU work: keep them off the event loop.
            ids = await asyncio.to_thread(self.engine.tokenizer.apply_chat_template, messages,
                                          add_generation_prompt=True)
        except ValueError as exc:
            raise invalid_request(str(exc), "messages") from exc
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        jobs = self._jobs(rid, [ids], req, "messages")
        streams = self._submit(jobs, req.timeout)
        created = int(time.time())
        model = self.engine.model_name
        want_logprobs = bool(req.logprobs)

        if req.stream:
            def chunk(choices: list[ChatStreamChoice], usage: Usage | None = None) -> str:
                return _sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, usage=usage,
                                                system_fingerprint=SYSTEM_FINGERPRINT).model_dump_json())

            plain = TextEvents(lambda i, text: chunk([ChatStreamChoice(index=i, delta=DeltaMessage(content=text))]))

            def render(job: _Job, out: RequestOutput, _: _Choice) -> str | None:
                if not (out.new_text or out.finished or (want_logprobs and out.logprobs)):
                    return None  # e.g. a token that ends mid-character: its text comes with the next one
                if _text_only(out, want_logprobs):
                    return plain(job.index, out.new_text)
                return chunk([ChatStreamChoice(
                    index=job.index, delta=DeltaMessage(content=out.new_text or None),
                    logprobs=_chat_logprobs(out.logprobs) if want_logprobs else None,
                    finish_reason=_finish_reason(out), stop_reason=out.stop_reason,
                )])

            first = [chunk([ChatStreamChoice(index=j.index, delta=DeltaMessage(role="assistant", content=""))])
                     for j in jobs]
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            usage = (lambda done: chunk([], _usage([len(ids)], done))) if include_usage else None
            return _SSEResponse(self._stream(jobs, streams, render, first, usage), streams)

        choices = await self._complete(request, jobs, streams)
        if choices is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        body = ChatCompletionResponse(
            id=rid, created=created, model=model, system_fingerprint=SYSTEM_FINGERPRINT,
            choices=[
                ChatChoice(index=i, message=AssistantMessage(content="".join(c.text)),
                           logprobs=_chat_logprobs(c.logprobs) if want_logprobs else None,
                           finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                for i, c in sorted(choices.items())
            ],
            usage=_usage([len(ids)], list(choices.values())),
        )
        return Response(body.model_dump_json(), media_type="application/json")

    async def completions(self, req: CompletionRequest, request: Request) -> Response:
        self._check(req)
        generations = len(req.prompt) * req.num_choices
        if generations > MAX_GENERATIONS:
            raise invalid_request(f"This request asks for {generations} generations ({len(req.prompt)} prompts x "
                                  f"n={req.num_choices}); the limit is {MAX_GENERATIONS}.", "prompt")
        prompts: list[list[int]] = []
        for prompt in req.prompt:
            if isinstance(prompt, str):
                prompts.append(await asyncio.to_thread(self.engine.tokenizer.encode, prompt,
                                                       add_special_tokens=True, allow_special=True))
            else:
                self._check_token_ids(prompt, "prompt")
                prompts.append(prompt)
        rid = f"cmpl-{uuid.uuid4().hex}"
        jobs = self._jobs(rid, prompts, req, "prompt")
        streams = self._submit(jobs, req.timeout)
        created = int(time.time())
        model = self.engine.model_name
        want_logprobs = req.logprobs is not None
        prompt_lens = [len(p) for p in prompts]

        if req.stream:
            def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
                return _sse(CompletionChunk(id=rid, created=created, model=model, choices=choices, usage=usage,
                                            system_fingerprint=SYSTEM_FINGERPRINT).model_dump_json())

            plain = TextEvents(lambda i, text: chunk([CompletionChoice(index=i, text=text)]))

            def render(job: _Job, out: RequestOutput, so_far: _Choice) -> str | None:
                if not (out.new_text or out.finished or (want_logprobs and out.logprobs)):
                    return None
                if _text_only(out, want_logprobs):
                    return plain(job.index, out.new_text)
                return chunk([CompletionChoice(
                    index=job.index, text=out.new_text,
                    logprobs=_completion_logprobs(out.logprobs, so_far.text_len) if want_logprobs else None,
                    finish_reason=_finish_reason(out), stop_reason=out.stop_reason,
                )])

            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            usage = (lambda done: chunk([], _usage(prompt_lens, done))) if include_usage else None
            return _SSEResponse(self._stream(jobs, streams, render, [], usage), streams)

        choices = await self._complete(request, jobs, streams)
        if choices is None:
            return Response(status_code=499)
        body = CompletionResponse(
            id=rid, created=created, model=model, system_fingerprint=SYSTEM_FINGERPRINT,
            choices=[
                CompletionChoice(index=i, text="".join(c.text),
                                 logprobs=_completion_logprobs(c.logprobs, 0) if want_logprobs else None,
                                 finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                for i, c in sorted(choices.items())
            ],
            usage=_usage(prompt_lens, list(choices.values())),
        )
        return Response(body.model_dump_json(), media_type="application/json")

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.engine.model_name, created=self.created,
                                         max_model_len=self.engine.max_model_len)])


class ServerState:
    """What the routes and the process runner share. The port opens before the weights load, so /health can
    say 503 (loading, warming up) instead of refusing connections; routes find the engine here once built."""

    def __init__(self) -> None:
        self.engine: AsyncEngine | None = None
        self.serving: _Serving | None = None
        self.status = "The model is loading."   # why not serving, before the engine exists
        self.on_fatal: Callable[[BaseException], None] | None = None  # set by the process runner

    def health(self) -> str | None:
        if self.engine is None:
            return self.status
        return self.engine.health()

    def require_serving(self) -> _Serving:
        if self.serving is None:
            raise not_ready(self.status)
        return self.serving

    async def drain(self, timeout: float, cut_short: asyncio.Event | None = None) -> None:
        """SIGTERM: /health turns 503 and admission stops at once; in-flight requests get `timeout` seconds,
        then the rest end with an error (in-band for streams) so no connection stays open for uvicorn."""
        if self.engine is None:
            self.status = "The server is shutting down."
            return
        logger.info("draining %d in-flight requests for up to %g s", self.engine.num_inflight, timeout)
        cut = await self.engine.drain(timeout, cut_short)
        if cut:
            logger.warning("shutdown timeout: ended %d unfinished requests", cut)


async def _in_daemon_thread(fn: Callable[[], T]) -> T:
    """Like asyncio.to_thread, but a daemon thread: the default executor's threads are joined at exit, so a
    SIGTERM during a long weight load would otherwise wait for the load to finish."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(setter: Callable, value) -> None:
        if not future.done():
            setter(value)

    def work() -> None:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            outcome = (future.set_exception, exc)
        else:
            outcome = (future.set_result, result)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop is gone (shutting down)
            pass

    threading.Thread(target=work, name="hybridserve-load", daemon=True).start()
    return await future


def create_app(engine: AsyncEngine | None = None, *, load: Callable[[], AsyncEngine] | None = None,
               api_key: str | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    """Serve `engine`, or the one `load()` builds (on a thread, after the port is open).

    The app owns the engine's lifetime: started in the background when the server starts (it needs the running
    event loop; /health is 503 until the warm-up generation is done), shut down when it stops."""
    if (engine is None) == (load is None):
        raise ValueError("pass exactly one of engine and load")
    state = ServerState()
    if engine is not None:
        state.engine, state.serving = engine, _Serving(engine)

    async def boot() -> None:
        try:
            eng = engine if engine is not None else await _in_daemon_thread(load)
            state.serving = _Serving(eng)
            state.engine = eng
            state.serving.metrics.start()
            await eng.start()
            logger.info("ready: serving %r", eng.model_name)
        except Exception as exc:
            if state.engine is not None and state.engine.draining:
                return  # a SIGTERM during warm-up ended it: a shutdown, not a failed start
            logger.exception("startup failed")
            state.status = f"Startup failed: {type(exc).__name__}: {exc}"
            state.engine = None
            if state.on_fatal is not None:
                state.on_fatal(exc)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(boot())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if state.serving is not None:
                await state.serving.metrics.stop()
            if state.engine is not None:
                await state.engine.shutdown()

    app = FastAPI(title="hybridserve", version=VERSION, lifespan=lifespan)
    app.state.hybridserve = state
    install_error_handlers(app)
    app.add_middleware(RequestGuard, api_key=api_key, max_request_bytes=max_request_bytes)
    v1 = APIRouter(prefix="/v1")

    @v1.post("/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        return await state.require_serving().chat(req, request)

    @v1.post("/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        return await state.require_serving().completions(req, request)

    @v1.get("/models")
    async def models() -> ModelList:
        return state.require_serving().models()

    app.include_router(v1)

    @app.get("/health")
    async def health() -> JSONResponse:
        """Readiness and liveness in one: 503 while loading or warming up, while draining for shutdown, and
        for good once the watchdog has seen a stuck engine step."""
        reason = state.health()
        if reason is not None:
            return not_ready(reason).response()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        serving = state.require_serving()
        return Response(serving.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
