"""Runs the engine loop on its own thread and hands outputs to asyncio consumers.

The HTTP layer awaits per-request queues; the engine thread never blocks on a client. add/abort are
posted to the engine thread, so the engine core is only ever touched from one thread.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import AsyncIterator

from hybridserve.engine.config import EngineStats
from hybridserve.engine.llm_engine import LLMEngine
from hybridserve.engine.request import FinishReason, RequestOutput, SamplingParams

log = logging.getLogger("hybridserve.engine")


class AsyncEngine:
    def __init__(self, engine: LLMEngine, model_name: str):
        self.engine = engine
        self.model_name = model_name
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.ready = False
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = False
        self._stats = engine.stats()

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="hybridserve-engine", daemon=True)
        self._thread.start()
        self.ready = True

    async def shutdown(self) -> None:
        self.ready = False
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
            self._thread = None

    def stats(self) -> EngineStats:
        return self._stats

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Yield incremental outputs; closing the generator early aborts the request."""
        self.engine.validate(prompt_token_ids, params)
        if request_id in self._queues:
            raise ValueError(f"duplicate request id {request_id}")
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        self._post(("add", request_id, list(prompt_token_ids), params))
        finished = False
        try:
            while True:
                out: RequestOutput = await q.get()
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._post(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._post(("abort", request_id))

    # -- engine thread --------------------------------------------------------------------------

    def _post(self, cmd) -> None:
        self._commands.put(cmd)
        self._wake.set()

    def _deliver(self, out: RequestOutput) -> None:
        q = self._queues.get(out.request_id)
        if q is not None:
            q.put_nowait(out)

    def _emit(self, outs: list[RequestOutput]) -> None:
        if outs and self._loop is not None:
            self._loop.call_soon_threadsafe(lambda: [self._deliver(o) for o in outs])

    def _run(self) -> None:
        eng = self.engine
        while not self._stop:
            failed = []
            while True:
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    break
                if cmd[0] == "add":
                    _, rid, ids, params = cmd
                    try:
                        eng.add_request(rid, ids, params)
                    except Exception as e:
                        failed.append(RequestOutput(rid, [], "", finished=True, finish_reason=FinishReason.ERROR,
                                                    error=str(e)))
                else:
                    eng.abort(cmd[1])
            self._emit(failed)
            if eng.has_work():
                try:
                    self._emit(eng.step())
                except Exception:  # step() already contains model errors; this is a bug guard
                    log.exception("engine loop error")
            self._stats = eng.stats()
            if not eng.has_work():
                self._wake.wait(0.05)
                self._wake.clear()
        # shutting down: end everything still in flight
        for rid in list(eng.seqs):
            eng.abort(rid)
            self._emit([RequestOutput(rid, [], "", finished=True, finish_reason=FinishReason.ABORT,
                                      error="server shutting down")])
        self._stats = eng.stats()
