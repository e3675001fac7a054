"""The engine core in its own process: the API process keeps the event loop (HTTP, SSE, admission, deadlines)
and the engine process runs engine/core_loop.py's loop over an LLMEngine, as vLLM splits its API server from
its engine core.

Why: on one interpreter the engine's per-step Python (schedule, inputs, sampling bookkeeping, detokenize) and
the event loop's per-event Python take turns on one lock. Past a few dozen streams the event loop alone is
busy most of a step, so the engine waits for the lock and the GPU idles between steps: served time per token
rose to about twice the engine step at 32 streams. Apart, each has its own core.

The wire (two one-way pipes, pickled tuples):
  API → engine: ("add", request_id, prompt_ids, SamplingParams), ("abort", request_id), ("ready", freeze_heap),
                ("stop",)
  engine → API: ("hello", EngineInfo) once the engine is built, or ("failed", message);
                ("update", outputs, started, Snapshot | None) per turn with something to say, each output as
                RequestOutput.to_wire's plain tuple.
The step watchdog reads the step's start time from shared memory, so it works while the engine is stuck in a
step. The engine process exits when told to or when its command pipe closes (the API process is gone), and
ignores SIGINT and SIGTERM: a terminal's Ctrl-C, or a service manager signalling every process of the service,
reaches both processes, and shutting down is the API process's drain to run.
"""
from __future__ import annotations

import asyncio
import atexit
import logging
import multiprocessing
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from hybridserve.engine.config import EngineConfig, EngineStats
from hybridserve.engine.core_loop import EngineFacts
from hybridserve.engine.gc_pauses import GcSummary, GcWatch, freeze_heap
from hybridserve.engine.request import RequestOutput

log = logging.getLogger("hybridserve.engine")

# While steps run, the engine's stats go out at most this often (and always when it turns idle): /metrics
# reads the latest, and an idle engine's figures are exact.
SNAPSHOT_INTERVAL = 0.05
READ_BATCH = 16


@dataclass
class EngineInfo:
    """The engine process's hello: the served name, the facts about the engine, and its stats at start."""

    model_name: str
    facts: EngineFacts
    stats: EngineStats


@dataclass
class Snapshot:
    stats: EngineStats
    device_memory: dict[str, int]
    jit_compiles: int | None
    jit_compiles_after_ready: int
    gc: GcSummary | None = None     # the engine process's collections since ready (engine/gc_pauses.py)
    cpu_seconds: float | None = None   # the engine process's CPU time so far (time.process_time)


class EngineStartError(RuntimeError):
    """The engine process could not build the engine (bad checkpoint, out of memory, ...)."""


class ProcessCore:
    """The API process's end of an engine process. `start_engine_process` builds one."""

    def __init__(self, proc, commands, updates, step_clock, info: EngineInfo):
        self._proc, self._commands, self._updates, self._step_clock = proc, commands, updates, step_clock
        self.model_name = info.model_name
        self.facts = info.facts
        self.engine = None                      # no LLMEngine in this process
        self.pid = proc.pid
        self._snapshot = Snapshot(info.stats, {}, None, 0)
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_update: Callable | None = None
        self._on_died: Callable[[str], None] | None = None
        self._stopping = False

    # ---- what the event-loop side reads -------------------------------------------------------------------

    def stats(self) -> EngineStats:
        return self._snapshot.stats

    def device_memory(self) -> dict[str, int]:
        return self._snapshot.device_memory

    @property
    def jit_compiles(self) -> int | None:
        return self._snapshot.jit_compiles

    @property
    def jit_compiles_after_ready(self) -> int:
        return self._snapshot.jit_compiles_after_ready

    @property
    def cpu_seconds(self) -> float | None:
        """The engine process's CPU time as of its last snapshot."""
        return self._snapshot.cpu_seconds

    @property
    def gc_summary(self) -> GcSummary | None:
        """The engine process's garbage collections since ready."""
        return self._snapshot.gc

    def step_started(self) -> float | None:
        t = self._step_clock.value
        return t if t > 0 else None

    def alive(self) -> bool:
        return self._proc.is_alive()

    # ---- lifecycle ----------------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop, on_update: Callable[[list[RequestOutput], list[str]], None],
              on_died: Callable[[str], None]) -> None:
        self._loop, self._on_update, self._on_died = loop, on_update, on_died
        # Commands leave through a thread: a long prompt's pickle may not fit the pipe while the engine is in a
        # step, and the event loop must not wait for that.
        self._sender = threading.Thread(target=self._send_loop, name="hybridserve-engine-send", daemon=True)
        self._sender.start()
        loop.add_reader(self._updates.fileno(), self._on_readable)

    def mark_ready(self, freeze: bool = False) -> None:
        """The server turned ready; `freeze`: the engine process freezes its heap (engine/gc_pauses.py) first."""
        self.post(("ready", freeze))

    def post(self, cmd: tuple) -> None:
        self._outbox.put(cmd)

    def request_stop(self) -> None:
        """Non-blocking: the engine process ends its loop after the step it is in."""
        self._stopping = True
        self.post(("stop",))

    def stop(self, hung: bool) -> None:
        """Blocking (run it off the event loop): ask the engine process to finish, wait, and end it by force
        if it does not (a hung step cannot stop by itself)."""
        self._stopping = True
        self.post(("stop",))
        self._outbox.put(None)
        self._proc.join(2 if hung else 30)
        if self._proc.is_alive():   # it ignores SIGTERM (see above)
            log.warning("the engine process did not stop; killing it")
            self._proc.kill()
            self._proc.join(5)
        if self._sender is not None:
            self._sender.join(5)

    def detach(self) -> None:
        """Stop reading updates (the event loop is about to close)."""
        if self._loop is not None:
            try:
                self._loop.remove_reader(self._updates.fileno())
            except (ValueError, OSError, RuntimeError):
                pass

    # ---- API-process internals ----------------------------------------------------------------------------

    def _send_loop(self) -> None:
        while (cmd := self._outbox.get()) is not None:
            try:
                self._commands.send(cmd)
            except (OSError, ValueError):   # the engine process is gone; the reader reports it
                return

    def _on_readable(self) -> None:
        """On the event loop: what the engine process has sent so far, up to READ_BATCH messages (the reader
        fires again for the rest, after the loop's other callbacks have had their turn)."""
        try:
            for _ in range(READ_BATCH):
                if not self._updates.poll():
                    break
                msg = self._updates.recv()
                if msg[0] == "update":
                    _, wire, started, snap = msg
                    if snap is not None:
                        self._snapshot = snap
                    if wire or started:
                        self._on_update([RequestOutput.from_wire(t) for t in wire], started)
        except (EOFError, OSError):
            self.detach()
            self._proc.join(1)
            if not self._stopping and self._on_died is not None:
                self._on_died(f"The engine process exited (exit code {self._proc.exitcode}).")


def start_engine_process(config: EngineConfig, log_level: str = "INFO") -> ProcessCore:
    """Spawn the engine process, wait until it has built the engine, and return the API side's end.
    Blocking (model load and graph capture: seconds to minutes). Raises EngineStartError if the build fails."""
    ctx = multiprocessing.get_context("spawn")   # a fresh interpreter: no inherited CUDA context or threads
    cmd_recv, cmd_send = ctx.Pipe(duplex=False)
    upd_recv, upd_send = ctx.Pipe(duplex=False)
    step_clock = ctx.Value("d", 0.0, lock=False)
    proc = ctx.Process(target=_engine_main, args=(config, cmd_recv, upd_send, step_clock, log_level),
                       name="hybridserve-engine", daemon=True)
    proc.start()
    atexit.register(_kill_left_behind, proc)
    cmd_recv.close()
    upd_send.close()
    while not upd_recv.poll(1.0):
        if not proc.is_alive():
            raise EngineStartError(f"the engine process exited while starting (exit code {proc.exitcode})")
    try:
        msg = upd_recv.recv()
    except EOFError:
        proc.join(5)
        raise EngineStartError(f"the engine process exited while starting (exit code {proc.exitcode})") from None
    if msg[0] != "hello":
        proc.join(10)
        raise EngineStartError(msg[1])
    return ProcessCore(proc, cmd_send, upd_recv, step_clock, msg[1])


def _kill_left_behind(proc) -> None:
    """At the API process's exit. An engine process still running here was never told to stop (a start cut
    short by SIGTERM, an error path); it ignores SIGTERM, so multiprocessing's own exit handling, which
    terminates and then joins daemonic children, would wait for it for ever."""
    if proc.is_alive():
        proc.kill()
        proc.join(5)


# ---- the engine process ---------------------------------------------------------------------------------------


def _engine_main(config: EngineConfig, commands, updates, step_clock, log_level: str) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from hybridserve.engine.build import build_llm_engine
    from hybridserve.engine.core_loop import run_core
    from hybridserve.engine.core_thread import ThreadCore

    try:
        eng, name = build_llm_engine(config)
        # A ThreadCore whose thread never starts: its facts, device memory and Triton compile watch (CUDA: what
        # compiles after ready, in this process) are what this process reports.
        core = ThreadCore(eng)
    except Exception as e:
        log.exception("engine process: the engine could not be built")
        updates.send(("failed", f"{type(e).__name__}: {e}"))
        return
    updates.send(("hello", EngineInfo(name, core.facts, eng.stats())))
    core.watch_compiles(True)
    state = {"stop": False, "last": 0.0, "stats": None}   # stop asked; the last snapshot's time and figures
    watch: list[GcWatch] = []                              # the collections' watch, from ready on

    def take(timeout: float) -> list:
        cmds = []
        if timeout > 0:
            commands.poll(timeout)
        try:
            while commands.poll():
                cmd = commands.recv()
                if cmd[0] == "stop":
                    state["stop"] = True
                elif cmd[0] == "ready":
                    if cmd[1]:
                        log.info("engine process: %d start-up objects frozen out of the collector's reach",
                                 freeze_heap())
                    if not watch:
                        watch.append(GcWatch())
                    core.mark_ready()
                else:
                    cmds.append(cmd)
        except EOFError:   # the API process is gone
            state["stop"] = True
        return cmds

    def report(outs: list[RequestOutput], started: list[str], idle: bool) -> None:
        """One message a turn with something to say; the stats ride along at most every SNAPSHOT_INTERVAL while
        busy, and whenever the engine turns idle with figures that changed."""
        now, snap = time.monotonic(), None
        if idle or now - state["last"] >= SNAPSHOT_INTERVAL:
            stats, gc_now = eng.stats(), (watch[0].summary() if watch else None)
            if not idle or (stats, gc_now) != state["stats"]:
                state["last"], state["stats"] = now, (stats, gc_now)
                snap = Snapshot(stats, core.device_memory(), core.jit_compiles, core.jit_compiles_after_ready,
                                gc_now, time.process_time())
        if outs or started or snap is not None:
            try:
                updates.send(("update", [o.to_wire() for o in outs], started, snap))
            except (OSError, ValueError):   # the API process is gone
                state["stop"] = True

    def mark_step(t: float | None) -> None:
        step_clock.value = t if t is not None else 0.0

    try:
        run_core(eng, take, report, mark_step, lambda: state["stop"])
    except BaseException:
        log.exception("engine process: the engine loop died")
        raise
    finally:
        core.watch_compiles(False)
