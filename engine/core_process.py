"""The engine core in its own process: the API process keeps the event loop (HTTP, SSE, admission, deadlines)
and the engine process runs engine/core_loop.py's loop over an LLMEngine, as vLLM splits its API server from
its engine core.

Why: on one interpreter the engine's per-step Python (schedule, inputs, sampling bookkeeping, detokenize) and
the event loop's per-event Python take turns on one lock. Past a few dozen streams the event loop alone is
busy most of a step, so the engine waits for the lock and the GPU idles between steps: served time per token
rose to about twice the engine step at 32 streams. Apart, each has its own core.

The wire (two one-way pipes per API process, pickled tuples):
  API → engine: ("add", request_id, prompt_ids, SamplingParams), ("abort", request_id), ("ready", freeze_heap),
                ("stop",)
  engine → API: ("hello", EngineInfo) once the engine is built, or ("failed", message);
                ("warm",) once the first API process has turned ready (the others wait for it);
                ("update", rows, started, Snapshot | None) per turn with something to say, the outputs as
                StepRows.to_wire's columns (engine/step_rows.py).
The step watchdog reads the step's start time from shared memory, so it works while the engine is stuck in a
step. The engine process exits when every API process has told it to or closed its command pipe (is gone), and
ignores SIGINT and SIGTERM: a terminal's Ctrl-C, or a service manager signalling every process of the service,
reaches both processes, and shutting down is the API process's drain to run.

Several API processes (`hybridserve serve --api-server-count N`, server/api_servers.py) each have their own pair
of pipes and an `EngineLink` naming it. The engine process remembers which process added each request and sends
each one only its own requests' outputs (and every one the stats); a process that leaves, or dies, has its
requests aborted, so their slots and pages go back to the pools. The first process warms the engine up.
"""
from __future__ import annotations

import asyncio
import atexit
import logging
import multiprocessing
import pickle
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from hybridserve.engine.config import EngineConfig, EngineStats
from hybridserve.engine.core_loop import EngineFacts
from hybridserve.engine.gc_pauses import GcSummary, GcWatch, freeze_heap
from hybridserve.engine.step_rows import StepRows

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


@dataclass
class EngineLink:
    """API process `index` of `count`: its ends of the pipes to the engine process and the step clock. Handed to
    that process when it is spawned (pipes and shared values pickle only then)."""

    commands: Connection   # sends
    updates: Connection    # receives
    step_clock: object     # multiprocessing.Value("d"): the running step's start, 0 between steps
    index: int = 0
    count: int = 1


class ProcessCore:
    """The API process's end of an engine process. `start_engine_process` builds one, or `connect_engine` where
    the engine process is not this process's child (several API processes)."""

    def __init__(self, proc, link: EngineLink, info: EngineInfo):
        self._proc, self._commands, self._updates = proc, link.commands, link.updates
        self._step_clock = link.step_clock
        self.model_name = info.model_name
        self.facts = info.facts
        self.engine = None                      # no LLMEngine in this process
        self.pid = proc.pid if proc is not None else None
        self.warms_up = link.index == 0         # the first API process runs the warm-up; the others wait for it
        self._warm: asyncio.Event | None = None
        self._gone = False
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
        return self._proc.is_alive() if self._proc is not None else not self._gone

    # ---- lifecycle ----------------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop, on_update: Callable[[StepRows, list[str]], None],
              on_died: Callable[[str], None]) -> None:
        self._loop, self._on_update, self._on_died = loop, on_update, on_died
        self._warm = asyncio.Event()
        if self.warms_up:
            self._warm.set()
        # Commands leave through a thread: a long prompt's pickle may not fit the pipe while the engine is in a
        # step, and the event loop must not wait for that.
        self._sender = threading.Thread(target=self._send_loop, name="hybridserve-engine-send", daemon=True)
        self._sender.start()
        loop.add_reader(self._updates.fileno(), self._on_readable)

    async def wait_warm(self) -> None:
        """Until the API process that warms the engine up has turned ready (at once for that one)."""
        await self._warm.wait()

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
        if self._proc is None:      # not this process's child: its parent waits for it (server/api_servers.py)
            if self._sender is not None:
                self._sender.join(5)
            return
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
                    if wire is not None or started:
                        self._on_update(StepRows.from_wire(wire) if wire is not None else StepRows(), started)
                elif msg[0] == "warm":
                    self._warm.set()
        except (EOFError, OSError):
            self.detach()
            self._gone = True
            code = ""
            if self._proc is not None:
                self._proc.join(1)
                code = f" (exit code {self._proc.exitcode})"
            if not self._stopping and self._on_died is not None:
                self._on_died(f"The engine process exited{code}.")


def spawn_engine_process(config: EngineConfig, log_level: str = "INFO", clients: int = 1
                         ) -> tuple[multiprocessing.process.BaseProcess, list[EngineLink]]:
    """Spawn the engine process for `clients` API processes and return it with one link per API process. Not
    blocking: the engine builds in the background and greets each link when done (`connect_engine`)."""
    ctx = multiprocessing.get_context("spawn")   # a fresh interpreter: no inherited CUDA context or threads
    ends, links = [], []
    step_clock = ctx.Value("d", 0.0, lock=False)
    for index in range(clients):
        cmd_recv, cmd_send = ctx.Pipe(duplex=False)
        upd_recv, upd_send = ctx.Pipe(duplex=False)
        ends.append((cmd_recv, upd_send))
        links.append(EngineLink(cmd_send, upd_recv, step_clock, index, clients))
    proc = ctx.Process(target=_engine_main, args=(config, ends, step_clock, log_level),
                       name="hybridserve-engine", daemon=True)
    proc.start()
    atexit.register(_kill_left_behind, proc)
    for cmd_recv, upd_send in ends:   # the engine process's ends: held there only, so its exit reads as EOF here
        cmd_recv.close()
        upd_send.close()
    return proc, links


def connect_engine(link: EngineLink, proc=None) -> ProcessCore:
    """Wait until the engine process has built the engine and greeted this link; return this process's end.
    Blocking (model load and graph capture: seconds to minutes). Raises EngineStartError if the build fails.
    `proc`: the engine process where it is this process's child."""
    def exited() -> EngineStartError:
        code = f" (exit code {proc.exitcode})" if proc is not None else ""
        return EngineStartError(f"the engine process exited while starting{code}")

    updates = link.updates
    while not updates.poll(1.0):
        if proc is not None and not proc.is_alive():
            raise exited()
    try:
        msg = updates.recv()
    except EOFError:
        if proc is not None:
            proc.join(5)
        raise exited() from None
    if msg[0] != "hello":
        if proc is not None:
            proc.join(10)
        raise EngineStartError(msg[1])
    return ProcessCore(proc, link, msg[1])


def start_engine_process(config: EngineConfig, log_level: str = "INFO") -> ProcessCore:
    """Spawn the engine process for this one API process, wait until it has built the engine, and return the
    API side's end. Blocking. Raises EngineStartError if the build fails."""
    proc, [link] = spawn_engine_process(config, log_level)
    return connect_engine(link, proc)


def name_process(name: str) -> None:
    """Show `name` (at most 15 characters) for this process in ps, top and /proc/<pid>/comm (Linux only)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15] + b"\0", 0, 0, 0)   # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _kill_left_behind(proc) -> None:
    """At the API process's exit. An engine process still running here was never told to stop (a start cut
    short by SIGTERM, an error path); it ignores SIGTERM, so multiprocessing's own exit handling, which
    terminates and then joins daemonic children, would wait for it for ever."""
    if proc.is_alive():
        proc.kill()
        proc.join(5)


# ---- the engine process ---------------------------------------------------------------------------------------


def _engine_main(config: EngineConfig, ends: list[tuple[Connection, Connection]], step_clock,
                 log_level: str) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    name_process("hs-engine")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from hybridserve.engine.build import build_llm_engine
    from hybridserve.engine.core_loop import run_core
    from hybridserve.engine.core_thread import ThreadCore

    commands = [c for c, _ in ends]
    updates = [u for _, u in ends]
    clients = Clients(len(ends))

    def send(i: int, msg: tuple) -> None:
        try:
            updates[i].send(msg)
        except (OSError, ValueError):   # that API process is gone
            clients.leave(i)

    try:
        eng, name = build_llm_engine(config)
        eng.detokenize = False     # the API processes make the text (engine/text_streams.py)
        # A ThreadCore whose thread never starts: its facts, device memory and Triton compile watch (CUDA: what
        # compiles after ready, in this process) are what this process reports.
        core = ThreadCore(eng)
    except Exception as e:
        log.exception("engine process: the engine could not be built")
        for i in clients.open():
            send(i, ("failed", f"{type(e).__name__}: {e}"))
        return
    for i in clients.open():
        send(i, ("hello", EngineInfo(name, core.facts, eng.stats())))
    core.watch_compiles(True)
    state = {"last": 0.0, "stats": None}   # the last snapshot's time and figures
    watch: list[GcWatch] = []              # the collections' watch, from ready on

    def take(timeout: float) -> list:
        cmds = clients.pending()
        if timeout > 0 and not cmds:
            wait([commands[i] for i in clients.open()], timeout)
        for i in clients.open():
            conn = commands[i]
            try:
                while conn.poll():
                    cmd = conn.recv()
                    if cmd[0] == "stop":
                        clients.leave(i)
                        break
                    if cmd[0] == "ready":
                        if watch:            # a later API process's ready: the first one's counts
                            continue
                        if cmd[1]:
                            log.info("engine process: %d start-up objects frozen out of the collector's reach",
                                     freeze_heap())
                        watch.append(GcWatch())
                        core.mark_ready()
                        for j in clients.open():
                            if j != i:
                                send(j, ("warm",))
                    else:
                        clients.posted(i, cmd)
                        cmds.append(cmd)
            except (EOFError, OSError):   # that API process is gone
                clients.leave(i)
        return cmds + clients.pending()

    def report(outs: StepRows, started: list[str], idle: bool) -> None:
        """One message a turn with something to say, to each API process its own requests' outputs; the stats
        ride along at most every SNAPSHOT_INTERVAL while busy, and whenever the engine turns idle with figures
        that changed."""
        now, snap = time.monotonic(), None
        if idle or now - state["last"] >= SNAPSHOT_INTERVAL:
            stats, gc_now = eng.stats(), (watch[0].summary() if watch else None)
            if not idle or (stats, gc_now) != state["stats"]:
                state["last"], state["stats"] = now, (stats, gc_now)
                snap = Snapshot(stats, core.device_memory(), core.jit_compiles, core.jit_compiles_after_ready,
                                gc_now, time.process_time())
        for i, (wire, gone) in clients.route(outs, started).items():
            if wire or gone or snap is not None:
                send(i, ("update", wire, gone, snap))

    def mark_step(t: float | None) -> None:
        step_clock.value = t if t is not None else 0.0

    try:
        run_core(eng, take, report, mark_step, clients.none_left)
    except BaseException:
        log.exception("engine process: the engine loop died")
        raise
    finally:
        core.watch_compiles(False)


class Clients:
    """The engine process's API processes: which are still there, and, with more than one, which of them added
    each request in flight (to send it the request's outputs, and to abort its requests if it leaves)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._open = list(range(count))
        self._owner: dict[str, int] = {}
        self._pending: list[tuple] = []

    def open(self) -> list[int]:
        return list(self._open)

    def none_left(self) -> bool:
        return not self._open

    def leave(self, i: int) -> None:
        """API process `i` stopped or is gone: its requests are aborted with the next commands."""
        if i in self._open:
            self._open.remove(i)
            theirs = [rid for rid, owner in self._owner.items() if owner == i]
            for rid in theirs:
                del self._owner[rid]
            self._pending += [("abort", rid) for rid in theirs]

    def pending(self) -> list[tuple]:
        out, self._pending = self._pending, []
        return out

    def posted(self, i: int, cmd: tuple) -> None:
        if self.count > 1:
            if cmd[0] == "add":
                self._owner[cmd[1]] = i
            elif cmd[0] == "abort":
                self._owner.pop(cmd[1], None)

    def route(self, outs: StepRows, started: list[str]) -> dict[int, tuple[tuple | None, list[str]]]:
        """Each open API process's share of a turn: (its outputs as StepRows' wire form, None for none; its
        requests that started). With several API processes each gets every plain row, pickled once (it skips
        those it does not hold), and its own other outputs."""
        if self.count == 1:
            return {0: (outs.to_wire() if outs else None, started)} if self._open else {}
        owner = self._owner
        shares: dict[int, tuple[tuple | None, list[str]]] = {i: (None, []) for i in self._open}
        for rid in started:
            share = shares.get(owner.get(rid, -1))
            if share is not None:
                share[1].append(rid)

        def owner_of(rid: str, finished: bool) -> int | None:
            return owner.pop(rid, None) if finished else owner.get(rid)
        others = outs.split_others(owner_of)
        columns = pickle.dumps(outs.columns(), pickle.HIGHEST_PROTOCOL) if outs.ids else None
        for i in shares:
            mine = others.get(i)
            if columns is not None or mine:
                shares[i] = (StepRows(others=mine or []).to_wire(columns or ([], [], [], [], [])), shares[i][1])
        return shares
