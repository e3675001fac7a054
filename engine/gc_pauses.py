"""Python's cyclic garbage collector in a serving process: its pauses timed, and the start-up heap moved out of
its reach once the server is warm.

A collection of the oldest generation stops every thread of the process and walks every tracked object. In a
serving process nearly all of them are start-up state that lives as long as the process: torch and the other
imported modules, the model's modules, the tokenizer, the graphs and pools. A full collection after building a
tiny engine on the CI box walks ~206k objects and takes 37-51 ms; the serving process on an H100, 105-155 ms.
It runs whenever enough young objects have survived, which a busy server's per-request objects do, and then
holds the step, the event loop or both for its length: at 128 streams an inter-token gap of 144 ms was seen and
not explained before (bench/NOTES.md, nineteenth session).

`freeze_heap` collects once and then moves every surviving object into the permanent generation
(`gc.freeze`): later collections walk only what was allocated since, and objects still die by reference
counting as before. A reference cycle among frozen objects is never collected, which is why the server freezes
once, after its warm-up, and only the serving process, which lives as long as its one engine
(`FREEZE_PROCESSES`; `hybridserve serve --no-gc-freeze` keeps the collector as it is).

`GcWatch` times each collection through `gc.callbacks` and keeps per-generation counts and seconds and the
longest pause: /metrics shows them for the serving process and for the engine process, so a stall in a served
run can be told apart from one in the step. That is how the 144 ms gap was found: NeoLLM served at 128 streams
on an H100, one full collection a round in the serving process of 105-155 ms, none over 2 ms in the engine
process.
"""
from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass

# Which processes freeze when the server asks for it. The serving process only: that is where the long pauses
# are. H100, NeoLLM served at 128 streams (bench/results/serve_latency_gc_freeze-h100.json), full collections
# in a round: serving process 105-155 ms each unfrozen, 9-12 ms frozen; engine process at most 2 ms either way.
# Frozen as well, the engine process served slower in all seven server instances tried (time per output token
# 2.0-3.0 ms against 1.65-1.95 with the serving process alone frozen), for no reason found: in one process,
# its engine step was the same frozen or not (engine_decode_gc_freeze-h100.json). The kept default against none
# (serve_latency_gc_freeze_default-h100.json): inter-token p99 at 128 streams 29-65 ms vs 31-149 (138-149 in the
# rounds with a full collection), at 64 streams 13-36 vs 20-136. An A/B knob
# (HYBRIDSERVE_GC_FREEZE_PROCESSES: api, engine or api,engine; bench/serve_latency.py --gc-freeze api|engine).
FREEZE_PROCESSES = frozenset(os.environ.get("HYBRIDSERVE_GC_FREEZE_PROCESSES", "api").split(","))


@dataclass(frozen=True)
class GcSummary:
    """Collections timed since the watch began: per generation (0, 1, 2) their number and seconds, the longest
    single pause, and the objects in the permanent generation now."""

    collections: tuple[int, int, int] = (0, 0, 0)
    seconds: tuple[float, float, float] = (0.0, 0.0, 0.0)
    longest: float = 0.0
    frozen: int = 0


class GcWatch:
    """Times this process's collections from construction until `close`. Callbacks run on whichever thread
    triggered the collection, under the interpreter lock, and collections do not nest."""

    def __init__(self) -> None:
        self._started: float | None = None
        self._collections = [0, 0, 0]
        self._seconds = [0.0, 0.0, 0.0]
        self._longest = 0.0
        gc.callbacks.append(self._on_phase)

    def _on_phase(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        if self._started is None:        # the watch began inside a collection
            return
        took = time.perf_counter() - self._started
        self._started = None
        generation = min(int(info.get("generation", 2)), 2)
        self._collections[generation] += 1
        self._seconds[generation] += took
        self._longest = max(self._longest, took)

    def summary(self) -> GcSummary:
        return GcSummary(tuple(self._collections), tuple(self._seconds), self._longest, frozen_count())

    def close(self) -> None:
        try:
            gc.callbacks.remove(self._on_phase)
        except ValueError:
            pass


# The permanent generation's size as of this process's last freeze_heap. gc.get_freeze_count() walks the whole
# permanent generation: after a server's freeze, ~200k objects, ~3 ms on the CI box, which an API process of
# several paid every 50 ms when it published its figures (engine/api_share.py) and one API process on each scrape.
_frozen: int | None = None


def frozen_count() -> int:
    """Objects out of the collector's reach: counted at this process's freeze (freeze_heap), else now."""
    return _frozen if _frozen is not None else gc.get_freeze_count()


def freeze_heap() -> int:
    """Collect everything collectable now, then put every surviving object out of later collections' reach.
    Returns the objects frozen."""
    global _frozen
    gc.collect()
    gc.freeze()
    _frozen = gc.get_freeze_count()
    return _frozen
