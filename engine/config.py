"""Engine configuration: what the CLI fills in and the engine sizes itself from."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    model: str = "embedded"              # a checkpoint path, or "embedded" for the packaged SmolLM2
    served_model_name: str | None = None  # name clients use; default derived from the checkpoint
    dtype: str = "auto"                  # auto | float32 | bfloat16 | float16
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    max_num_seqs: int = 64               # upper bound on concurrent requests (memory may lower it)
    max_model_len: int | None = None     # default: the model's context length
    max_num_batched_tokens: int = 2048   # token budget per engine step (chunked prefill size)
    kv_cache_memory: int | None = None   # bytes for KV pages + state slots; default: derived from device memory
    page_size: int = 16                  # tokens per KV page
    num_kv_pages: int | None = None      # fixed KV page count instead of the budget split (tests, tuning)
    enforce_eager: bool = False          # disable CUDA graphs
    async_scheduling: bool | None = None  # launch each decode step before reading the last one's tokens
                                         # (engine/inflight.py); None = on where decode runs as CUDA graphs
    seed: int = 0
    warmup: str = "auto"                 # start-up warm-up before ready (engine/warmup.py): basic | shapes;
                                         # auto = shapes where kernels JIT-compile (CUDA), basic elsewhere
    # Admission and liveness, enforced by AsyncEngine (the engine core never sees them).
    max_queued_requests: int = 256       # submitted but not yet running; beyond this new requests get 503
    max_queued_tokens: int = 65536       # prompt tokens of those queued requests; same
    request_timeout: float = 0.0         # seconds from submission to the last token; 0 = none
    watchdog_timeout: float = 120.0      # an engine step longer than this marks the engine unhealthy; 0 = off


@dataclass
class StateGroupStats:
    used: int
    total: int
    bytes_per_slot: int


@dataclass
class EngineStats:
    """A snapshot for /metrics and the startup log; cheap to take."""

    num_running: int
    num_waiting: int
    kv_pages_used: int
    kv_pages_total: int
    kv_page_bytes: int
    state_groups: dict[str, StateGroupStats]
    weights_bytes: int
    num_preemptions: int
    max_concurrency: int
