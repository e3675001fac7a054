"""What several API processes in front of one engine process (`hybridserve serve --api-server-count N`,
server/api_servers.py) tell each other: one shared array of doubles, a row per API process, each row written only
by its own process and read by all.

A row holds that process's admission counts (requests and prompt tokens submitted but not yet seen running, and
its open streams) and its own figures for /metrics (CPU time and garbage collections). Admission then bounds the
sum over all rows, as one API process bounds its own counts: `--max-queued-requests` and `--max-queued-tokens`
mean the same with one API process or several. Each process checks and counts on its own event loop, so two
processes admitting at the same instant may overshoot a bound by the requests of one submission each; nothing
else is shared, and no lock is held across processes.

A double holds every count exactly (up to 2**53); an aligned 8-byte store is not torn on the platforms served.
"""
from __future__ import annotations

import multiprocessing
from multiprocessing.context import BaseContext

from hybridserve.engine.gc_pauses import GcSummary

FIELDS = ("queued_requests", "queued_tokens", "inflight", "cpu_seconds",
          "gc0", "gc1", "gc2", "gc0_seconds", "gc1_seconds", "gc2_seconds", "gc_longest", "gc_frozen")
_AT = {name: i for i, name in enumerate(FIELDS)}
WIDTH = len(FIELDS)


def shared_rows(count: int, ctx: BaseContext | None = None):
    """The array for `count` API processes (all zero), to hand to each of them at spawn."""
    ctx = ctx or multiprocessing.get_context("spawn")
    return ctx.Array("d", count * WIDTH, lock=False)


class ApiShare:
    """API process `index`'s view of the rows of `count` processes."""

    def __init__(self, rows, index: int, count: int) -> None:
        if not 0 <= index < count or len(rows) != count * WIDTH:
            raise ValueError(f"row {index} of {count} does not fit an array of {len(rows)}")
        self.rows, self.index, self.count = rows, index, count
        self._own = index * WIDTH

    def label(self, index: int) -> str:
        """The `process` label of API process `index` on /metrics."""
        return f"api-{index}"

    # ---- this process's row -------------------------------------------------------------------------------

    def set_queued(self, requests: int, tokens: int) -> None:
        self.rows[self._own + _AT["queued_requests"]] = requests
        self.rows[self._own + _AT["queued_tokens"]] = tokens

    def set_inflight(self, n: int) -> None:
        self.rows[self._own + _AT["inflight"]] = n

    def publish(self, cpu_seconds: float, gc: GcSummary | None) -> None:
        """This process's CPU time and collections, for whichever process a scrape reaches."""
        row = self._own
        self.rows[row + _AT["cpu_seconds"]] = cpu_seconds
        if gc is not None:
            for g in range(3):
                self.rows[row + _AT[f"gc{g}"]] = gc.collections[g]
                self.rows[row + _AT[f"gc{g}_seconds"]] = gc.seconds[g]
            self.rows[row + _AT["gc_longest"]] = gc.longest
            self.rows[row + _AT["gc_frozen"]] = gc.frozen

    # ---- the other processes' rows ------------------------------------------------------------------------

    def others_queued(self) -> tuple[int, int]:
        """(requests, prompt tokens) the other API processes count against the admission bounds."""
        r, t = _AT["queued_requests"], _AT["queued_tokens"]
        rows = [i * WIDTH for i in range(self.count) if i != self.index]
        return int(sum(self.rows[i + r] for i in rows)), int(sum(self.rows[i + t] for i in rows))

    def total_inflight(self) -> int:
        return int(sum(self.rows[i * WIDTH + _AT["inflight"]] for i in range(self.count)))

    def cpu_seconds(self) -> dict[str, float]:
        return {self.label(i): self.rows[i * WIDTH + _AT["cpu_seconds"]] for i in range(self.count)}

    def gc_summaries(self) -> dict[str, GcSummary]:
        out = {}
        for i in range(self.count):
            row = i * WIDTH

            def at(name: str) -> float:
                return self.rows[row + _AT[name]]

            out[self.label(i)] = GcSummary(tuple(int(at(f"gc{g}")) for g in range(3)),
                                           tuple(at(f"gc{g}_seconds") for g in range(3)),
                                           at("gc_longest"), int(at("gc_frozen")))
        return out
