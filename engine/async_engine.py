"""The event-loop side of the engine: per-request streams for the HTTP layer, over an engine core that runs
elsewhere, on its own thread (engine/core_thread.py) or in its own process (engine/core_process.py).

The HTTP layer reads per-request streams; the engine core never blocks on a client. add/abort are posted
to the core, so the engine is only ever touched from one thread.

Everything that decides whether a request may run, and for how long, lives here on the event-loop side:
admission (bounded queue), deadlines, the step watchdog and draining. Those decisions are synchronous on the
one event-loop thread, so they stay exact however many clients race; the engine thread only reports back
which requests left the waiting queue.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hybridserve.engine import warmup
from hybridserve.engine.api_share import ApiShare
from hybridserve.engine.config import EngineStats
from hybridserve.engine.core_thread import ThreadCore
from hybridserve.engine.gc_pauses import FREEZE_PROCESSES, GcSummary, GcWatch, freeze_heap
from hybridserve.engine.llm_engine import LLMEngine
from hybridserve.engine.request import FinishReason, RequestOutput, SamplingParams
from hybridserve.engine.detokenizer import IncrementalDetokenizer
from hybridserve.engine.step_rows import StepRows, plain_output
from hybridserve.engine.text_streams import whole_text

if TYPE_CHECKING:
    from hybridserve.engine.core_process import ProcessCore

log = logging.getLogger("hybridserve.engine")


# ---- why a request was refused or ended from outside the engine core ----------------------------------------


class EngineRejected(Exception):
    """The engine does not take this request now; the same request may succeed later (HTTP 503)."""

    retry_after = 1


class QueueFull(EngineRejected):
    """The admission queue is at its request or prompt-token bound."""


class NotAccepting(EngineRejected):
    """Loading, warming up, draining for shutdown, or unhealthy."""

    retry_after = 5


class RequestEnded(Exception):
    """Raised from a request's stream when it was ended from outside the engine core."""


class RequestTimedOut(RequestEnded):
    pass


class EngineUnhealthy(RequestEnded):
    pass


class ShuttingDown(RequestEnded):
    pass


def step_overdue(step_started: float | None, now: float, timeout: float) -> bool:
    """The watchdog's decision: a step is running (started is set) and has run longer than `timeout`
    (0 = watchdog off)."""
    return timeout > 0 and step_started is not None and now - step_started > timeout


def effective_timeout(requested: float | None, server_default: float) -> float | None:
    """A request may ask for a shorter deadline than the server's, never a longer one; 0 means none."""
    limits = [t for t in (requested, server_default) if t]
    return min(limits) if limits else None


# ---- per-request state -------------------------------------------------------------------------------------


@dataclass
class _Entry:
    """Event-loop side bookkeeping of one submitted request."""

    queue: asyncio.Queue
    prompt_tokens: int
    text: IncrementalDetokenizer  # its text and stop strings, made here (engine/text_streams.py)
    queued: bool = True          # counted against the admission bounds (not yet seen running)
    done: bool = False           # its last item (final output or an exception) is in the queue
    timer: asyncio.TimerHandle | None = None


class RequestStream:
    """The outputs of one submitted request, in order. Iteration raises a RequestEnded subclass when the
    request is ended from outside (deadline, watchdog, shutdown). close() aborts an unfinished request and
    must always be called: it is what frees the request's admission share, slot and pages."""

    def __init__(self, engine: AsyncEngine, request_id: str, q: asyncio.Queue) -> None:
        self._engine = engine
        self.request_id = request_id
        self._queue = q
        self._ended = False
        self._held: RequestOutput | BaseException | None = None   # taken from the queue, not yet returned

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._ended:
            raise StopAsyncIteration
        if self._held is not None:
            item, self._held = self._held, None
        else:
            item = await self._queue.get()
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        self._ended = item.finished
        return item

    async def next_merged(self) -> RequestOutput:
        """The next output, merged with every output already queued behind it (`RequestOutput.merged`): a reader
        that fell behind the engine catches up in one step instead of one per token, and waits for nothing
        that has not arrived. An engine error or an ending from outside is never merged: it comes next, alone.
        Raises StopAsyncIteration after the last output, as iteration ends."""
        out = await self.__anext__()
        if out.finished or out.error is not None:
            return out
        run = [out]
        queue = self._queue
        while not queue.empty():
            item = queue.get_nowait()
            if isinstance(item, BaseException) or item.error is not None:
                self._held = item
                break
            run.append(item)
            if item.finished:
                break
        if len(run) == 1:
            return out
        out = RequestOutput.merged(run)
        self._ended = out.finished
        return out

    def close(self) -> None:
        self._engine._close(self.request_id)


async def _consume_warmup(stream: RequestStream, first: asyncio.Event) -> None:
    """Read a warm-up request to its end; `first` is set at its first output (or its end)."""
    try:
        async for out in stream:
            first.set()
            if out.error is not None:
                raise RuntimeError(f"warm-up generation failed: {out.error}")
    finally:
        first.set()
        stream.close()


class AsyncEngine:
    """`core`: an LLMEngine (driven on a thread of this process) or a ProcessCore (an engine process).

    `share`: where this is one of several API processes in front of one engine process (engine/api_share.py),
    the rows through which their admission bounds count all of them, and /metrics shows each one."""

    def __init__(self, core: LLMEngine | ThreadCore | ProcessCore, model_name: str, gc_freeze: bool = False,
                 share: ApiShare | None = None):
        if isinstance(core, LLMEngine):
            core = ThreadCore(core)
        self.core = core
        if core.engine is not None:
            core.engine.detokenize = False   # the text is made here (engine/text_streams.py), as behind a process
        self.engine: LLMEngine | None = core.engine   # the engine object itself, when it is in this process
        self.model_name = model_name
        self.facts = facts = core.facts
        self.tokenizer = facts.tokenizer
        self.max_model_len = facts.max_model_len
        self.sampling_defaults = facts.sampling_defaults
        config = facts.config
        self.max_queued_requests = max(1, config.max_queued_requests)
        self.max_queued_tokens = config.max_queued_tokens
        self.request_timeout = config.request_timeout
        self.watchdog_timeout = config.watchdog_timeout
        self.ready = False                # warm-up done, accepting requests
        self.draining = False             # shutting down: finishing in-flight requests, refusing new ones
        self.unhealthy: str | None = None  # why the engine can no longer serve (sticky until restart)
        # Freeze the start-up heap once warm, in the processes engine/gc_pauses.py FREEZE_PROCESSES names (this
        # one): for a server's one engine; off where a process builds engines one after another (tests), whose
        # cycles a freeze would keep for ever.
        self.gc_freeze = gc_freeze
        self._gc_watch: GcWatch | None = None
        self.share = share
        self._requests: dict[str, _Entry] = {}
        self._queued_requests = 0
        self._queued_tokens = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._watchdog: asyncio.Task | None = None
        self.warmup_mode = warmup.resolve(config.warmup, facts.device_type)

    # ---- lifecycle -----------------------------------------------------------------------------------------

    async def start(self, warm_up: bool = True) -> None:
        """Start the engine core's loop, run one real generation, then arm the watchdog and turn ready.

        The warm-up runs unwatched: a first step may legitimately be slow (kernel JIT and autotuning), and a
        start that hangs is the readiness probe's to catch, not the step watchdog's."""
        if self._started:
            return
        self._loop = asyncio.get_running_loop()
        self._started = True
        self.draining = False
        self.core.start(self._loop, self._on_engine_update, self._mark_unhealthy)
        if warm_up and self.core.warms_up:
            await self._warm_up()
        await self.core.wait_warm()   # one API process warms the engine up; the others wait for it
        if self.watchdog_timeout > 0:
            self._watchdog = asyncio.create_task(self._watch())
        if self.gc_freeze and "api" in FREEZE_PROCESSES:
            log.info("%d start-up objects frozen out of the collector's reach", freeze_heap())
        if self._gc_watch is None:
            self._gc_watch = GcWatch()
        self.ready = True
        self.core.mark_ready(self.gc_freeze and "engine" in FREEZE_PROCESSES)

    @property
    def jit_compiles_after_ready(self) -> int:
        """Triton compiles (CUDA) after the server turned ready: each a step shape the warm-up did not meet."""
        return self.core.jit_compiles_after_ready

    async def _warm_up(self) -> None:
        """Serve the warm-up's waves (engine/warmup.py) through schedule → forward → sample → detokenize: the
        first steps pay one-off costs (lazy init, allocator growth, kernel compiles for the eager step shapes),
        and an engine that cannot generate must never report ready. A wave is submitted once every request of
        the one before has its first token, so its prompts arrive while those decode."""
        core = self.core
        t0, compiled = time.monotonic(), core.jit_compiles
        facts = self.facts
        waves = warmup.plan(self.warmup_mode, self.tokenizer, self.max_model_len, facts.step_budget,
                            facts.max_num_seqs, facts.limits.kv_tokens)
        tasks: list[asyncio.Task] = []
        try:
            for i, wave in enumerate(waves):
                started = []
                for req in wave:
                    if i:   # the first wave is the one generation that must work; later ones only if servable
                        try:
                            self.validate(req.prompt_ids, req.params)
                        except ValueError:
                            continue
                    stream = self._register(f"warmup-{uuid.uuid4().hex}", req.prompt_ids, req.params,
                                            timeout=None, queued=False)
                    first = asyncio.Event()
                    tasks.append(asyncio.create_task(_consume_warmup(stream, first)))
                    started.append(first)
                for first in started:
                    await first.wait()
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
        now = core.jit_compiles
        log.info("warm-up (%s): %d requests in %.2f s%s", self.warmup_mode, len(tasks), time.monotonic() - t0,
                 f", {now - compiled} kernel variants compiled" if now is not None and compiled is not None else "")

    async def drain(self, timeout: float, cut_short: asyncio.Event | None = None, grace: float = 5.0) -> int:
        """Graceful shutdown: refuse new requests, let in-flight ones finish for up to `timeout` seconds (or
        until `cut_short` is set), end the rest with ShuttingDown, then give their consumers `grace` seconds
        to write their final error and close. Returns how many requests were cut off."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self._requests and time.monotonic() < deadline and not (cut_short and cut_short.is_set()):
            await asyncio.sleep(0.02)
        cut = sum(not e.done for e in self._requests.values())
        self._end_all(lambda: ShuttingDown("The server is shutting down; this request did not finish within "
                                           f"the shutdown timeout ({timeout:g} s)."))
        deadline = time.monotonic() + grace
        while self._requests and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return cut

    async def shutdown(self) -> None:
        self.ready = False
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._end_all(lambda: ShuttingDown("The server is shutting down."))
        self._requests.clear()
        self._queued_requests = self._queued_tokens = 0
        self._share_counts()
        if self._started:
            # A hung step never returns: do not let it hold the process past a short wait.
            await asyncio.to_thread(self.core.stop, self.unhealthy is not None)
            self._started = False
        if self._gc_watch is not None:
            self._gc_watch.close()
            self._gc_watch = None

    def health(self) -> str | None:
        """None when serving; otherwise why not (for /health and 503 bodies)."""
        if self.unhealthy:
            return self.unhealthy
        if self.draining:
            return "The server is shutting down."
        if not self.ready:
            return "The engine is not ready yet (starting or warming up)."
        return None

    def stats(self) -> EngineStats:
        return self.core.stats()

    def publish(self) -> None:
        """Where there are several API processes: this one's CPU time and collections into its shared row."""
        if self.share is not None:
            self.share.publish(time.process_time(),
                               self._gc_watch.summary() if self._gc_watch is not None else None)

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time so far by process: "api" (this one; with several API processes, "api-<i>" for each) and, where
        the engine has its own process, "engine" (as of its last stats snapshot)."""
        if self.share is not None:
            self.publish()
            out = self.share.cpu_seconds()
        else:
            out = {"api": time.process_time()}
        if self.core.cpu_seconds is not None:
            out["engine"] = self.core.cpu_seconds
        return out

    def gc_summaries(self) -> dict[str, GcSummary]:
        """Garbage collections since ready, by process: "api" (this one, which also runs an engine thread) and,
        where the engine has its own process, "engine". With several API processes, "api-<i>" for each."""
        if self.share is not None:
            self.publish()
            out = self.share.gc_summaries()
        else:
            out = {"api": self._gc_watch.summary()} if self._gc_watch is not None else {}
        if self.core.gc_summary is not None:
            out["engine"] = self.core.gc_summary
        return out

    @property
    def num_inflight(self) -> int:
        """Submitted requests whose streams are still open."""
        return len(self._requests)

    @property
    def num_inflight_all(self) -> int:
        """The same over every API process in front of the engine."""
        return self.share.total_inflight() if self.share is not None else len(self._requests)

    @property
    def device_memory(self) -> dict[str, int]:
        """Bytes the CUDA caching allocator holds in tensors (allocated) and from the driver (reserved) on the
        engine's device; empty off CUDA. After the pools and graphs are built these stay flat while serving, so
        growth across rounds of traffic is a leak. An engine process reports them with its stats."""
        return self.core.device_memory()

    @property
    def num_queued(self) -> tuple[int, int]:
        """(requests, prompt tokens) counted against the admission bounds."""
        return self._queued_requests, self._queued_tokens

    # ---- requests ------------------------------------------------------------------------------------------

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError for a request the engine can never serve. Pure: call it before committing to a
        response (e.g. before an SSE stream starts), so refusals are real 400s."""
        self.facts.limits.check(prompt_ids, params)

    def submit(self, requests: Sequence[tuple[str, list[int], SamplingParams]],
               timeout: float | None = None) -> list[RequestStream]:
        """Admit all of `requests` or none of them (the n choices of one HTTP request). Callers validate
        first; the engine core re-checks on add and fails the request with an error output.

        Raises NotAccepting or QueueFull (retry later), ValueError (the batch can never be admitted).
        Synchronous on purpose: check-and-count cannot interleave with another submit."""
        reason = self.health()
        if reason is not None:
            raise NotAccepting(reason)
        if self._loop is None:
            raise NotAccepting("The engine is not started.")
        n, tokens = len(requests), sum(len(ids) for _, ids, _ in requests)
        if n > self.max_queued_requests:
            raise ValueError(f"This request starts {n} generations; the server queues at most "
                             f"{self.max_queued_requests}.")
        queued, queued_tokens = self._queued_requests, self._queued_tokens
        if self.share is not None:
            others, other_tokens = self.share.others_queued()
            queued, queued_tokens = queued + others, queued_tokens + other_tokens
        if queued + n > self.max_queued_requests:
            raise QueueFull(f"The server is overloaded: {queued} requests are waiting "
                            f"(limit {self.max_queued_requests}). Retry shortly.")
        if queued and queued_tokens + tokens > self.max_queued_tokens:
            # An empty queue always admits, so one long prompt is never refused forever.
            raise QueueFull(f"The server is overloaded: {queued_tokens} prompt tokens are waiting "
                            f"(limit {self.max_queued_tokens}). Retry shortly.")
        ids_seen = {rid for rid, _, _ in requests}
        if len(ids_seen) != n or any(rid in self._requests for rid in ids_seen):
            raise ValueError("duplicate request id")
        deadline = effective_timeout(timeout, self.request_timeout)
        return [self._register(rid, ids, params, deadline) for rid, ids, params in requests]

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       timeout: float | None = None) -> AsyncIterator[RequestOutput]:
        """Validate, submit one request and yield its outputs; closing the generator early aborts it."""
        self.validate(prompt_token_ids, params)
        stream = self.submit([(request_id, list(prompt_token_ids), params)], timeout)[0]
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    async def abort(self, request_id: str) -> None:
        """End a request from outside its consumer: it gets a final ABORT output."""
        entry = self._requests.get(request_id)
        if entry is not None and not entry.done:
            self._end(request_id, entry, RequestOutput(request_id, [], "", finished=True,
                                                       finish_reason=FinishReason.ABORT))

    # ---- event-loop side bookkeeping -----------------------------------------------------------------------

    def _register(self, rid: str, ids: list[int], params: SamplingParams, timeout: float | None,
                  queued: bool = True) -> RequestStream:
        entry = _Entry(asyncio.Queue(), len(ids), IncrementalDetokenizer(self.tokenizer, ids, params), queued=queued)
        self._requests[rid] = entry
        if queued:
            self._queued_requests += 1
            self._queued_tokens += len(ids)
        self._share_counts()
        if timeout is not None:
            entry.timer = self._loop.call_later(timeout, self._expire, rid, timeout)
        self._post(("add", rid, list(ids), params))
        return RequestStream(self, rid, entry.queue)

    def _unqueue(self, entry: _Entry) -> None:
        if entry.queued:
            entry.queued = False
            self._queued_requests -= 1
            self._queued_tokens -= entry.prompt_tokens
            self._share_counts()

    def _share_counts(self) -> None:
        """Where there are several API processes: this one's admission counts into its shared row."""
        if self.share is not None:
            self.share.set_queued(self._queued_requests, self._queued_tokens)
            self.share.set_inflight(len(self._requests))

    def _end(self, rid: str, entry: _Entry, last: RequestOutput | BaseException, abort: bool = True) -> None:
        """Give the consumer its last item now; `abort`: and abort the request in the engine core (which has
        not ended it itself)."""
        entry.done = True
        if entry.timer is not None:
            entry.timer.cancel()
        self._unqueue(entry)
        entry.queue.put_nowait(last)
        if abort:
            self._post(("abort", rid))

    def _end_all(self, make_error: Callable[[], BaseException]) -> None:
        for rid, entry in list(self._requests.items()):
            if not entry.done:
                self._end(rid, entry, make_error())

    def _close(self, rid: str) -> None:
        entry = self._requests.pop(rid, None)
        if entry is None:
            return
        if entry.timer is not None:
            entry.timer.cancel()
        self._unqueue(entry)
        self._share_counts()
        if not entry.done:
            self._post(("abort", rid))

    def _expire(self, rid: str, timeout: float) -> None:
        entry = self._requests.get(rid)
        if entry is not None and not entry.done:
            self._end(rid, entry, RequestTimedOut(f"The request did not finish within its timeout ({timeout:g} s)."))

    def _on_engine_update(self, rows: StepRows, started: list[str]) -> None:
        """The engine core's outputs of a turn, each through its request's text stream into its queue. Entries
        gone or done are skipped: closed, timed out or failed meanwhile, or ended here by a stop string; the
        engine abort is already posted."""
        requests = self._requests
        facts = self.facts
        state_bytes, page_bytes = facts.state_bytes, facts.page_bytes
        for rid, token, count, prompt, pages in rows.plain():
            entry = requests.get(rid)
            if entry is None or entry.done:
                continue
            text, stop = entry.text.step_token(token)
            out = plain_output(rid, token, text, count, prompt, pages, state_bytes, page_bytes, stop)
            if stop is None:
                entry.queue.put_nowait(out)
            else:
                self._end(rid, entry, out)
        for out in rows.others:
            entry = requests.get(out.request_id)
            if entry is None or entry.done:
                continue
            out, stopped = whole_text(entry.text, out)
            if out.finished:
                self._end(out.request_id, entry, out, stopped)
            else:
                entry.queue.put_nowait(out)
        for rid in started:
            entry = self._requests.get(rid)
            if entry is not None:
                self._unqueue(entry)

    async def _watch(self) -> None:
        """The step watchdog. Runs on the event loop, so it still fires while the engine thread is stuck
        inside a step (the GIL is released by torch ops and by a hung device wait)."""
        interval = min(1.0, self.watchdog_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            started, now = self.core.step_started(), time.monotonic()
            if step_overdue(started, now, self.watchdog_timeout):
                self._mark_unhealthy(f"An engine step has run for {now - started:.1f} s, longer than the watchdog "
                                     f"timeout ({self.watchdog_timeout:g} s); the server must be restarted.")
                return

    def _mark_unhealthy(self, reason: str) -> None:
        """Sticky: /health stays 503 so an orchestrator restarts the process. In-flight requests get the error
        now, from this side, because the engine thread may never come back to deliver anything."""
        if self.unhealthy:
            return
        log.error("engine unhealthy: %s", reason)
        self.unhealthy = reason
        self.ready = False
        self.core.request_stop()
        self._end_all(lambda: EngineUnhealthy(reason))

    def _post(self, cmd) -> None:
        self.core.post(cmd)
