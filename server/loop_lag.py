"""How late the server process's event loop runs: a task asks to sleep INTERVAL seconds and records how much
later it woke. An idle loop wakes within a fraction of a millisecond. A busy one runs every ready callback in
turn first, so the timer waits behind them, and so do new requests (accepted, parsed, submitted) and the tokens
each stream sends.

Past ~64 streams the loop is busy nearly all the time: on an H100 host serving NeoLLM-110M the server process
used 0.90-0.97 cores at 64-128 streams (0.8 at 32), this lag averaged 4-8 ms (under 1 ms at 32), and at 128
streams a request waited ~100 ms or more before its submission against 10-35 ms from submission to first token
(bench/NOTES.md, twenty-seventh session). The lag histogram on /metrics shows that state to an operator, beside
the processes' CPU time.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

INTERVAL = 0.05


class LoopLag:
    """Samples the running loop's lag every `interval` seconds into `observe` while started."""

    def __init__(self, observe: Callable[[float], None], interval: float = INTERVAL) -> None:
        self.observe, self.interval = observe, interval
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="hybridserve-loop-lag")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time()
            await asyncio.sleep(self.interval)
            self.observe(max(0.0, loop.time() - asked - self.interval))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
