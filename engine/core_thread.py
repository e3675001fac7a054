"""The engine core on a thread of the serving process: engine/core_loop.py's loop over an LLMEngine held here.

The simplest arrangement, and the one tests and CPU serving use: commands go through a queue, outputs come
back with `call_soon_threadsafe`. The engine's per-step Python shares the interpreter lock with the event loop,
which costs served latency at high concurrency; engine/core_process.py moves the loop to its own process.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from hybridserve.engine.config import EngineStats
from hybridserve.engine.core_loop import EngineFacts, run_core
from hybridserve.engine.step_rows import StepRows
from hybridserve.kernels.jit_watch import Compile, JitWatch

if TYPE_CHECKING:
    from hybridserve.engine.llm_engine import LLMEngine

log = logging.getLogger("hybridserve.engine")


class ThreadCore:
    """An LLMEngine driven by run_core on a daemon thread. Its public methods are ProcessCore's too."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.facts = EngineFacts.of(engine)
        self._stats = engine.stats()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._step_started: float | None = None
        # Triton compiles in this process (CUDA only): those after ready are counted and logged, each being a
        # step shape the warm-up did not meet and a pause inside somebody's request.
        self._ready = False
        self.jit_compiles_after_ready = 0
        self._jit = JitWatch(self._on_compile) if self.facts.device_type == "cuda" else None

    def _on_compile(self, c: Compile) -> None:
        if self._ready:
            self.jit_compiles_after_ready += 1
            log.warning("kernel %s compiled after the server turned ready (%.2f s, blocking the engine step): a "
                        "step shape the start-up warm-up did not meet; variant %s", c.kernel, c.seconds, c.variant)

    @property
    def jit_compiles(self) -> int | None:
        """Triton compiles seen so far (None where they are not watched)."""
        return len(self._jit.compiles) if self._jit is not None else None

    def compiles_since(self, count: int) -> list[Compile]:
        """The compiles after the first `count` (each with its kernel and variant)."""
        return self._jit.since(count) if self._jit is not None else []

    # ---- lifecycle (event-loop side) ----------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop, on_update: Callable[[StepRows, list[str]], None],
              on_died: Callable[[str], None]) -> None:
        self._stop = False
        self._thread = threading.Thread(target=self._run, args=(loop, on_update, on_died),
                                        name="hybridserve-engine", daemon=True)
        self._thread.start()
        self.watch_compiles(True)

    def watch_compiles(self, on: bool) -> None:
        if self._jit is not None:
            (self._jit.start if on else self._jit.stop)()

    def mark_ready(self, freeze: bool = False) -> None:
        """The server turned ready. `freeze` is ProcessCore's: this core shares the serving process, whose heap
        the AsyncEngine freezes."""
        self._ready = True

    # the engine's collections and CPU time are the serving process's own (AsyncEngine.gc_summaries, cpu_seconds)
    gc_summary = None
    cpu_seconds = None
    # the one process that serves this engine warms it up (ProcessCore: one of several API processes)
    warms_up = True

    async def wait_warm(self) -> None:
        return None

    def post(self, cmd: tuple) -> None:
        self._commands.put(cmd)
        self._wake.set()

    def request_stop(self) -> None:
        """Non-blocking: the loop ends after the step it is in (if that step ever returns)."""
        self._stop = True
        self._wake.set()

    def stop(self, hung: bool) -> None:
        """Blocking (run it off the event loop): stop the loop and wait for the thread. A hung step never
        returns, so then the wait is short and the daemon thread is left behind."""
        self._ready = False
        self.watch_compiles(False)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(2 if hung else 30)
            self._thread = None

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def step_started(self) -> float | None:
        return self._step_started

    def stats(self) -> EngineStats:
        return self._stats

    def device_memory(self) -> dict[str, int]:
        """Read now (at scrape time), not each step."""
        if self.facts.device_type != "cuda":
            return {}
        device = self.engine.model.device
        return {"allocated": torch.cuda.memory_allocated(device), "reserved": torch.cuda.memory_reserved(device)}

    # ---- engine thread ------------------------------------------------------------------------------------

    def _take(self, timeout: float) -> list:
        if timeout > 0:
            self._wake.wait(timeout)
            self._wake.clear()
        cmds = []
        while True:
            try:
                cmds.append(self._commands.get_nowait())
            except queue.Empty:
                return cmds

    def _mark_step(self, t: float | None) -> None:
        self._step_started = t

    def _run(self, loop: asyncio.AbstractEventLoop, on_update, on_died) -> None:
        def report(outs: StepRows, started: list[str], idle: bool) -> None:
            self._stats = self.engine.stats()   # before the outputs: a consumer at its last output sees these
            if outs or started:
                try:
                    loop.call_soon_threadsafe(on_update, outs, started)
                except RuntimeError:  # the event loop is closed: nobody is left to read these
                    pass

        try:
            run_core(self.engine, self._take, report, self._mark_step, lambda: self._stop)
        except BaseException as exc:
            log.exception("engine thread died")
            try:
                loop.call_soon_threadsafe(on_died, f"The engine thread died: {exc!r}")
            except RuntimeError:
                pass
