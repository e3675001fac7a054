"""Several API processes in front of one engine process: `hybridserve serve --api-server-count N`.

Why: one API process's event loop runs the HTTP, SSE and admission work of every stream, and past ~64 streams it
is the limit. Serving NeoLLM-110M on an H100 at 64-128 streams it used 0.90-0.97 of a core, its loop ran timers
4-8 ms late, and a request waited ~100 ms before it was submitted (bench/NOTES.md, twenty-seventh session). With N
processes the streams' event work spreads over N cores, while the engine, its batch and its pools stay one.

The arrangement, as in vLLM's `--api-server-count`:
- This process (the parent) binds the listening socket, spawns the engine process (engine/core_process.py) with a
  pair of pipes per API process, then spawns the N API processes and hands each the socket, its pipes, its row of
  the shared admission counts (engine/api_share.py) and a control pipe. It serves no request itself.
- Each API process runs the same app over the shared socket; the kernel gives each new connection to whichever
  process accepts it first, so an idle loop takes the next one. API process 0 warms the engine up; the others
  turn ready when the engine says it is warm.
- /metrics: counters and histograms are kept in prometheus-client's multiprocess files (PROMETHEUS_MULTIPROC_DIR,
  a fresh directory this process sets before spawning and removes at exit), so any process a scrape reaches
  reports the sums over all of them; the engine's gauges come from its snapshots, which every API process gets,
  and each API process's CPU time and collections are shown under `process="api-<i>"`.
- Signals: the API processes ignore SIGINT and SIGTERM, and this process hands on each one it receives through the
  control pipes, so a signal sent to the whole service counts once. The first drains (each API process finishes
  its in-flight requests), the second cuts the drain short, the third exits at once. When the API processes have
  exited, the engine process, which every one of them has told to stop, is waited for and, if a step hangs, killed.
- An API process that exits on its own (a failed start, a crash) takes the service down: the others drain, and
  this process exits with status 1, for the orchestrator to restart it. The engine process's requests from a
  process that died are aborted, so nothing is held.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from hybridserve.engine.api_share import shared_rows
from hybridserve.engine.config import EngineConfig
from hybridserve.engine.core_process import EngineLink, name_process, spawn_engine_process

log = logging.getLogger("hybridserve")

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# how long the engine process may take to stop once every API process has gone (a hung step never does)
ENGINE_STOP_WAIT_S = 15
BACKLOG = 2048


@dataclass
class ApiSettings:
    """What each API process needs to build its app and server (picklable)."""

    api_key: str | None
    max_request_bytes: int
    gc_freeze: bool
    log_level: str
    shutdown_timeout: float
    loop: str
    http: str


def listen(host: str, port: int) -> socket.socket:
    """The one listening socket every API process accepts on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=BACKLOG)


def serve_api_processes(settings: ApiSettings, config: EngineConfig, count: int, host: str, port: int) -> int:
    """Run the service: the engine process and `count` API processes. Returns the exit status: 0 after a drain
    the signals asked for, 1 if an API process exited on its own."""
    ctx = multiprocessing.get_context("spawn")
    try:
        sock = listen(host, port)
    except OSError as e:
        log.error("cannot listen on %s:%d: %s", host, port, e)
        return 1
    metrics_dir = tempfile.mkdtemp(prefix="hybridserve-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir    # read by each spawned process at its import
    received: list[int] = []
    originals = {sig: signal.signal(sig, lambda s, _: received.append(s)) for sig in SIGNALS}
    engine, links = spawn_engine_process(config, settings.log_level, count)
    log.info("engine process %d started; %d API processes on %s:%d", engine.pid, count, host, port)
    rows = shared_rows(count, ctx)
    procs, controls = [], []
    for link in links:
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_api_main, args=(settings, link, rows, sock, recv),
                           name=f"hybridserve-api-{link.index}")
        proc.start()
        recv.close()
        link.commands.close()    # held by that API process only: its death reads as EOF in the engine process
        link.updates.close()
        procs.append(proc)
        controls.append(send)
    sock.close()
    try:
        failed = _supervise(procs, controls, received)
    finally:
        for sig, handler in originals.items():
            signal.signal(sig, handler)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        engine.join(ENGINE_STOP_WAIT_S)
        if engine.is_alive():   # it ignores SIGTERM; a step that never returns cannot stop by itself
            log.warning("the engine process did not stop; killing it")
            engine.kill()
            engine.join(5)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 1 if failed else 0


def _supervise(procs: list, controls: list[Connection], received: list[int]) -> bool:
    """Hand on each signal received; wait until every API process has exited. Returns whether one exited on its
    own (before any signal)."""
    forwarded, failed = 0, False
    running = set(range(len(procs)))
    while running:
        wait([procs[i].sentinel for i in running], timeout=0.2)
        while forwarded < len(received):
            sig = received[forwarded]
            forwarded += 1
            log.info("%s: handed on to the API processes", signal.Signals(sig).name)
            _hand_on(controls, running, sig)
        for i in sorted(running):
            if procs[i].is_alive():
                continue
            procs[i].join()
            running.discard(i)
            code = procs[i].exitcode
            if forwarded == 0 and not failed:
                failed = True
                log.error("API process %d exited on its own (exit code %s); stopping the others", i, code)
                _hand_on(controls, running, signal.SIGTERM)
            elif code:
                failed = True
                log.error("API process %d exited with code %s", i, code)
    return failed


def _hand_on(controls: list[Connection], running: set[int], sig: int) -> None:
    for i in running:
        try:
            controls[i].send(int(sig))
        except (OSError, ValueError):   # exited meanwhile
            pass


def _api_main(settings: ApiSettings, link: EngineLink, rows, sock: socket.socket, control: Connection) -> None:
    """One API process: the app over the shared socket, its engine end through `link`."""
    for sig in SIGNALS:   # the parent hands them on (see above)
        signal.signal(sig, signal.SIG_IGN)
    name_process(f"hs-api-{link.index}")
    logging.basicConfig(level=settings.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s %(name)s[api-{link.index}]: %(message)s")
    from hybridserve.engine.api_share import ApiShare
    from hybridserve.engine.async_engine import AsyncEngine
    from hybridserve.engine.core_process import connect_engine
    from hybridserve.server.app import create_app
    from hybridserve.server.cli import log_loaded
    from hybridserve.server.runtime import serve

    def load() -> AsyncEngine:
        t0 = time.monotonic()
        core = connect_engine(link)
        engine = AsyncEngine(core, core.model_name, gc_freeze=settings.gc_freeze,
                             share=ApiShare(rows, link.index, link.count))
        if link.index == 0:
            log_loaded(engine)
        else:
            log.info("connected to the engine after %.1f s", time.monotonic() - t0)
        return engine

    app = create_app(load=load, api_key=settings.api_key, max_request_bytes=settings.max_request_bytes)
    raise SystemExit(serve(app, "", 0, settings.log_level, settings.shutdown_timeout, settings.loop,
                           settings.http, sockets=[sock], control=control))
