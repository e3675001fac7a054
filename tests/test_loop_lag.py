"""server/loop_lag.py: the sampler sees a loop held up by a blocking callback, and stops cleanly."""
from __future__ import annotations

import asyncio
import time

from hybridserve.server.loop_lag import LoopLag


def test_loop_lag_sees_a_blocked_loop():
    seen: list[float] = []

    async def scenario() -> None:
        lag = LoopLag(seen.append, interval=0.01)
        lag.start()
        lag.start()                          # once only
        await asyncio.sleep(0.05)
        time.sleep(0.3)                      # a callback that holds the loop
        await asyncio.sleep(0.05)
        await lag.stop()
        n = len(seen)
        await asyncio.sleep(0.05)
        assert len(seen) == n                # stopped: no more samples
        await lag.stop()                     # twice is harmless

    asyncio.run(scenario())
    assert len(seen) >= 3 and min(seen) >= 0
    assert max(seen) >= 0.2                  # the sample that waited behind the blocking call
