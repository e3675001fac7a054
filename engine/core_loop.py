"""The engine core's loop: the one place that drives LLMEngine, on an engine thread (engine/core_thread.py) or
in an engine process (engine/core_process.py), the same code either way.

Each turn: apply the commands posted since the last turn (add, abort), run one step if there is work, then
hand the step's outputs and the requests that left the waiting queue to the event-loop side. With no work it
blocks in `take` for up to IDLE_WAIT seconds, so a posted command wakes it at once and an idle engine costs
nothing. When the loop ends, for whatever reason, every request still in the engine is aborted, so its slot
and pages go back to the pools.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hybridserve.engine.config import EngineConfig
from hybridserve.engine.request import FinishReason, RequestLimits, RequestOutput
from hybridserve.engine.step_rows import StepRows

if TYPE_CHECKING:
    from hybridserve.engine.llm_engine import LLMEngine

log = logging.getLogger("hybridserve.engine")

IDLE_WAIT = 0.05


@dataclass
class EngineFacts:
    """What the event-loop side needs to know of the engine, wherever the engine runs (picklable: an engine
    process sends it once at start)."""

    config: EngineConfig
    tokenizer: object
    max_model_len: int
    sampling_defaults: dict
    limits: RequestLimits
    device_type: str
    step_budget: int        # tokens a step schedules (the warm-up plans its waves by these two)
    max_num_seqs: int
    state_bytes: int = 0    # a request's fixed state memory, and a KV page's bytes (StepRows' plain rows)
    page_bytes: int = 0

    @classmethod
    def of(cls, eng: LLMEngine) -> EngineFacts:
        return cls(eng.config, eng.tokenizer, eng.max_model_len, eng.sampling_defaults, eng.limits,
                   eng.model.device.type, eng.scheduler.budget, eng.scheduler.max_num_seqs,
                   eng._state_bytes_each, eng._kv_page_bytes)


def run_core(eng: LLMEngine, take: Callable[[float], list],
             report: Callable[[StepRows, list[str], bool], None],
             mark_step: Callable[[float | None], None], stopped: Callable[[], bool]) -> None:
    """Drive `eng` until `stopped()`.

    take(timeout): the commands posted since the last call, waiting up to `timeout` seconds for one when there
        are none: ("add", request_id, prompt_ids, params) or ("abort", request_id); others are ignored here.
    report(rows, started, idle): after every turn, its outputs (StepRows) and the requests that are no longer
        waiting in the engine (both may be empty), and whether no work is left; the engine's stats are current
        then.
    mark_step(t): the monotonic time a step started, then None when it ended (the watchdog reads it)."""
    waiting: set[str] = set()     # added, not yet seen leaving the waiting queue
    try:
        while not stopped():
            outs = StepRows()
            for cmd in take(0.0 if eng.has_work() else IDLE_WAIT):
                if cmd[0] == "add":
                    _, rid, ids, params = cmd
                    try:
                        eng.add_request(rid, ids, params)
                        waiting.add(rid)
                    except Exception as e:
                        outs.others.append(RequestOutput(rid, [], "", finished=True,
                                                         finish_reason=FinishReason.ERROR,
                                                         num_prompt_tokens=len(ids), error=str(e)))
                elif cmd[0] == "abort":
                    eng.abort(cmd[1])
            if eng.has_work():
                mark_step(time.monotonic())
                try:
                    rows = eng.step_rows()
                    if outs.others:
                        rows.others[:0] = outs.others
                    outs = rows
                except Exception:  # step() already contains model errors; this is a bug guard
                    log.exception("engine loop error")
                finally:
                    mark_step(None)
            gone = [rid for rid in waiting if not eng.is_waiting(rid)]
            waiting.difference_update(gone)
            report(outs, gone, not eng.has_work())
    finally:
        # Stopped (shutdown, watchdog, or the other side gone): release everything still held.
        for rid in list(eng.seqs):
            eng.abort(rid)
        report(StepRows(), [], True)
