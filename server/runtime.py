"""The server process: uvicorn, with SIGTERM/SIGINT handled by us so the drain is ours, not uvicorn's.

uvicorn's own graceful shutdown closes the listener and then waits for open connections, which an SSE
stream keeps open for as long as it generates; and it re-raises the signal afterwards, so the process would
die "by SIGTERM" instead of exiting 0. Here the first signal starts a drain (503 on /health and for new
requests, in-flight requests finish or are ended in-band after --shutdown-timeout), and only then is uvicorn
told to exit, with no connection left busy.

One of several API processes (server/api_servers.py) ignores the signals itself: its parent receives them and
hands each one on through a pipe, so a signal sent to the whole service (a terminal's Ctrl-C, a service manager's
SIGTERM to every process) still counts once.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Generator
from multiprocessing.connection import Connection
from types import FrameType

import uvicorn
from fastapi import FastAPI

from hybridserve.server.app import ServerState

logger = logging.getLogger("hybridserve")

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# After the drain, connections only finish writing their last bytes; anything slower is a stuck client.
CONNECTION_GRACE_S = 5


class HybridServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, shutdown_timeout: float,
                 control: Connection | None = None) -> None:
        super().__init__(config)
        self.control = control    # where the parent hands on the signals it received, instead of our own
        self.state = state
        self.shutdown_timeout = shutdown_timeout
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signals = 0
        self._cut_short: asyncio.Event | None = None
        self._drain_task: asyncio.Task | None = None
        state.on_fatal = self._fatal

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        self._cut_short = asyncio.Event()
        await super().serve(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """Like uvicorn's, minus re-raising the signal at the end: a drained shutdown exits with status 0."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        if self.control is not None:
            threading.Thread(target=self._read_control, name="hybridserve-signals", daemon=True).start()
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """1st signal: drain. 2nd: stop waiting for in-flight requests (they end in-band now). 3rd: exit at once.
        Runs in a signal handler: only hand work to the event loop from here."""
        self._signals += 1
        if self._loop is None:
            self.should_exit = True
        elif self._signals == 1:
            self._loop.call_soon_threadsafe(self._start_drain, signal.Signals(sig).name)
        elif self._signals == 2:
            self._loop.call_soon_threadsafe(self._cut_short.set)
        else:
            self.force_exit = self.should_exit = True

    def _read_control(self) -> None:
        """The parent's signals, one message each; its end closing (the parent is gone) counts as a first one."""
        while True:
            try:
                sig = self.control.recv()
            except (EOFError, OSError):
                if self._signals == 0:
                    self.handle_exit(signal.SIGTERM, None)
                return
            self.handle_exit(sig, None)

    def _start_drain(self, name: str) -> None:
        logger.info("%s: not ready any more; draining (shutdown timeout %g s)", name, self.shutdown_timeout)
        self._drain_task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            await self.state.drain(self.shutdown_timeout, self._cut_short)
        except Exception:
            logger.exception("drain failed")
        finally:
            self.should_exit = True

    def _fatal(self, exc: BaseException) -> None:
        """The model failed to load or warm up: exit non-zero so the orchestrator sees a failed start."""
        self.exit_code = 1
        self.should_exit = True


def serve(app: FastAPI, host: str, port: int, log_level: str, shutdown_timeout: float, loop: str = "auto",
          http: str = "auto", sockets: list | None = None, control: Connection | None = None) -> int:
    """Run until drained after a signal (exit status 0) or a failed start (1). `sockets`: listen on these (bound
    by the parent and shared by several API processes) instead of binding host:port; `control`: the signals come
    from the parent through this pipe."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", loop=loop, http=http,
                            timeout_graceful_shutdown=CONNECTION_GRACE_S)
    server = HybridServer(config, app.state.hybridserve, shutdown_timeout, control)
    server.run(sockets=sockets)
    return server.exit_code
