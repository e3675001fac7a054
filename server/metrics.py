"""Prometheus metrics with vLLM's names under a `hybridserve:` prefix, so vLLM dashboards work unchanged, plus
separate gauges for the recurrent-state slot pools (vLLM folds those into `kv_cache_usage_perc`).

Latency and token metrics are observed here in the API layer; pool and scheduler gauges are read from
`engine.stats()` at scrape time, so they are never stale and cost nothing between scrapes.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hybridserve.engine.request import RequestOutput
from hybridserve.server.loop_lag import LoopLag

if TYPE_CHECKING:
    from hybridserve.engine.async_engine import AsyncEngine

PREFIX = "hybridserve:"

# vLLM's buckets (vllm/v1/metrics/loggers.py), so percentiles line up across servers.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
# the event loop's lag (server/loop_lag.py): under a millisecond when idle, tens to hundreds when saturated
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


def token_buckets(max_value: int) -> list[float]:
    """1-2-5 steps up to max_value (vLLM's build_1_2_5_buckets)."""
    buckets: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return buckets
            buckets.append(value)
        exponent += 1


class _EngineStatsCollector(Collector):
    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        s = self.engine.stats()
        m = self.model_name

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric([m], value)
            return family

        yield gauge("num_requests_inflight", "Submitted requests whose output streams are still open.",
                    self.engine.num_inflight_all)
        yield gauge("num_requests_running", "Requests in the running batch.", s.num_running)
        yield gauge("num_requests_waiting", "Requests waiting for admission.", s.num_waiting)
        yield gauge("kv_cache_usage_perc", "Fraction of KV pages in use (0-1); state slots are separate.",
                    s.kv_pages_used / s.kv_pages_total if s.kv_pages_total else 0.0)
        yield gauge("kv_pages_used", "KV pages in use.", s.kv_pages_used)
        yield gauge("kv_pages_total", "KV pages in the pool.", s.kv_pages_total)
        yield gauge("max_concurrency", "Most requests the memory budget admits at once.", s.max_concurrency)

        preemptions = CounterMetricFamily(PREFIX + "num_preemptions", "Requests preempted by the scheduler.",
                                          labels=["model_name"])
        preemptions.add_metric([m], s.num_preemptions)
        yield preemptions
        compiles = CounterMetricFamily(PREFIX + "jit_compiles_after_ready",
                                       "Triton kernel variants compiled after the server turned ready (each one "
                                       "a pause in the step that met it; the start-up warm-up should leave none).",
                                       labels=["model_name"])
        compiles.add_metric([m], self.engine.jit_compiles_after_ready)
        yield compiles
        yield from self._gc_families(m)
        cpu = CounterMetricFamily(PREFIX + "process_cpu_seconds", "CPU time (user + system, all threads) of the "
                                  "server process (api) and the engine process (engine): about 1 s a second for "
                                  "api means its event loop is the limit.", labels=["model_name", "process"])
        for process, seconds in self.engine.cpu_seconds().items():
            cpu.add_metric([m, process], seconds)
        yield cpu

        groups = s.state_groups.items()
        memory = GaugeMetricFamily(PREFIX + "memory_bytes", "Engine memory by component, in bytes.",
                                   labels=["model_name", "component"])
        for component, value in (
            ("weights", s.weights_bytes),
            ("kv_total", s.kv_pages_total * s.kv_page_bytes),
            ("kv_used", s.kv_pages_used * s.kv_page_bytes),
            ("state_total", sum(g.total * g.bytes_per_slot for _, g in groups)),
            ("state_used", sum(g.used * g.bytes_per_slot for _, g in groups)),
        ):
            memory.add_metric([m, component], value)
        yield memory
        device_memory = self.engine.device_memory
        if device_memory:
            device = GaugeMetricFamily(PREFIX + "device_memory_bytes",
                                       "CUDA caching allocator bytes on the engine's device (allocated, reserved).",
                                       labels=["model_name", "kind"])
            for kind, value in device_memory.items():
                device.add_metric([m, kind], value)
            yield device

        per_group = {
            "state_slots_used": ("State slots in use, per state group.", lambda g: g.used),
            "state_slots_total": ("State slots in the pool, per state group.", lambda g: g.total),
            "state_bytes_per_slot": ("Bytes of one state slot, per state group.", lambda g: g.bytes_per_slot),
            "state_usage_perc": ("Fraction of state slots in use (0-1), per state group.",
                                 lambda g: g.used / g.total if g.total else 0.0),
        }
        for name, (doc, value_of) in per_group.items():
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name", "group"])
            for group, g in groups:
                family.add_metric([m, group], value_of(g))
            yield family

    def _gc_families(self, m: str) -> Iterator[Metric]:
        """Python's garbage collections since ready (engine/gc_pauses.py), by process: `api` (the serving
        process, with the engine thread where there is no engine process) and `engine`."""
        summaries = self.engine.gc_summaries()
        labels = ["model_name", "process", "generation"]
        collections = CounterMetricFamily(PREFIX + "gc_collections", "Python garbage collections since ready.",
                                          labels=labels)
        seconds = CounterMetricFamily(PREFIX + "gc_pause_seconds", "Time spent in Python garbage collections "
                                      "since ready (each one stops its whole process).", labels=labels)
        longest = GaugeMetricFamily(PREFIX + "gc_pause_longest_seconds",
                                    "The longest Python garbage collection since ready.", labels=labels[:2])
        frozen = GaugeMetricFamily(PREFIX + "gc_frozen_objects", "Objects out of the collector's reach (the "
                                   "serving process freezes its start-up heap once warm unless --no-gc-freeze).",
                                   labels=labels[:2])
        for process, s in summaries.items():
            for generation in range(3):
                collections.add_metric([m, process, str(generation)], s.collections[generation])
                seconds.add_metric([m, process, str(generation)], s.seconds[generation])
            longest.add_metric([m, process], s.longest)
            frozen.add_metric([m, process], s.frozen)
        yield from (collections, seconds, longest, frozen)


def multiprocess_dir() -> str | None:
    """prometheus-client's multiprocess mode: where each process's metric files are (read at its import)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


class ServerMetrics:
    """One registry per app (not prometheus' global one), so several apps can live in one process."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.registry = CollectorRegistry()
        name = self.model_name = engine.model_name
        labels = ["model_name"]

        def counter(metric: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + metric, doc, labels + list(extra), registry=self.registry)

        def histogram(metric: str, doc: str, buckets: tuple[float, ...] | list[float]) -> Histogram:
            return Histogram(PREFIX + metric, doc, labels, buckets=buckets, registry=self.registry).labels(name)

        # prometheus-client appends `_total` to counters: these expose `hybridserve:prompt_tokens_total`, etc.
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens submitted.").labels(name)
        self.generation_tokens = counter("generation_tokens", "Tokens generated.").labels(name)
        self._success = counter("request_success", "Finished requests by finish reason.", ("finished_reason",))
        self.success = {r: self._success.labels(name, r) for r in ("stop", "length", "abort")}
        self._rejected = counter("request_rejected", "Requests refused with 503 before submission, by reason.",
                                 ("reason",))
        self._failed = counter("request_failure", "Accepted requests that ended with an error, by reason.",
                               ("reason",))
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between successive token outputs.", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.", E2E_BUCKETS)
        token_bins = token_buckets(engine.max_model_len)
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Prompt length per request.", token_bins)
        self.request_generation_tokens = histogram("request_generation_tokens", "Generated tokens per request.",
                                                   token_bins)
        self.loop_lag = histogram("event_loop_lag_seconds", "How much later than asked the server process's event "
                                  "loop ran a timer, sampled every 50 ms: past a few ms the loop is busy, and new "
                                  "requests and every stream's tokens wait behind its callbacks.", LAG_BUCKETS)
        if engine.share is None:
            self._lag = LoopLag(self.loop_lag.observe)
            self._scraped = self.registry
        else:
            # One of several API processes (server/api_servers.py): the counters and histograms above live in
            # prometheus-client's multiprocess files (PROMETHEUS_MULTIPROC_DIR, set before this process started),
            # and a scrape, which reaches any one of the processes, sums them over all; the engine's and each
            # process's own figures come from the shared rows (engine/api_share.py), which the lag timer also
            # refreshes.
            from prometheus_client import multiprocess

            if not multiprocess_dir():
                raise RuntimeError("several API processes need PROMETHEUS_MULTIPROC_DIR set before they start")

            def tick(lag: float) -> None:
                self.loop_lag.observe(lag)
                engine.publish()

            self._lag = LoopLag(tick)
            self._scraped = CollectorRegistry()
            multiprocess.MultiProcessCollector(self._scraped)
        self._scraped.register(_EngineStatsCollector(engine, name))

    def start(self) -> None:
        """On the serving event loop: start sampling its lag."""
        self._lag.start()

    async def stop(self) -> None:
        await self._lag.stop()

    def rejected(self, reason: str) -> None:
        """reason: queue_full | not_serving (loading, draining or unhealthy)."""
        self._rejected.labels(self.model_name, reason).inc()

    def failed(self, reason: str) -> None:
        """reason: timeout | shutdown | unhealthy | engine_error | invalid."""
        self._failed.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self._scraped)

    def track(self, num_prompt_tokens: int) -> RequestTracker:
        return RequestTracker(self, num_prompt_tokens)


def observe_zeros(histogram, count: int) -> None:
    """`count` observations of 0.0 at once, as that many `observe(0.0)` calls record them: the lowest bucket that
    holds 0 counts them all and the sum is unchanged. A merged output of n tokens gives n - 1 such latencies, and
    a stream that fell behind merges many (one observe costs a lock and a bucket search, in the multiprocess mode
    a write into a mapped file). Falls back to the calls where the histogram's internals differ or its first bucket
    does not hold 0."""
    bounds, buckets = getattr(histogram, "_upper_bounds", None), getattr(histogram, "_buckets", None)
    if not bounds or buckets is None or len(buckets) != len(bounds) or bounds[0] < 0.0:
        for _ in range(count):
            histogram.observe(0.0)
        return
    buckets[0].inc(count)


class RequestTracker:
    """Timing of one engine request, from submission to finish or abort; times use the monotonic clock."""

    def __init__(self, metrics: ServerMetrics, num_prompt_tokens: int) -> None:
        self.metrics = metrics
        self.num_prompt_tokens = num_prompt_tokens
        self.num_output_tokens = 0
        self.start = time.monotonic()
        self.last_token_time: float | None = None
        self.done = False
        metrics.prompt_tokens.inc(num_prompt_tokens)

    def observe(self, out: RequestOutput) -> None:
        """An output as the client gets it: its first token after the wait since the last, the others with it
        (an output of several tokens: a stream that caught up, server/app.py MERGE_QUEUED). So the latencies
        are one per token after the first, and they add up to the time from the first token to the last."""
        n = len(out.new_token_ids)
        if n:
            now = time.monotonic()
            if self.last_token_time is None:
                self.metrics.ttft.observe(now - self.start)
            else:
                self.metrics.itl.observe(now - self.last_token_time)
            if n > 1:
                observe_zeros(self.metrics.itl, n - 1)
            self.last_token_time = now
            self.num_output_tokens += n
            self.metrics.generation_tokens.inc(n)
        if out.finished:
            reason = out.finish_reason.value if out.finish_reason is not None else None
            self.finish(reason)

    def finish(self, reason: str | None) -> None:
        """Counted once; `reason` outside stop/length/abort (an engine error) is not a success."""
        if self.done:
            return
        self.done = True
        m = self.metrics
        m.e2e.observe(time.monotonic() - self.start)
        m.request_prompt_tokens.observe(self.num_prompt_tokens)
        m.request_generation_tokens.observe(self.num_output_tokens)
        if reason in m.success:
            m.success[reason].inc()
