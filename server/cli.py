"""`hybridserve` command line. Each subcommand is one `add_<name>_command(subparsers)` function that registers
its arguments and sets `func`; `main` only dispatches."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import re
from collections.abc import Callable, Sequence

from hybridserve.engine.config import EngineConfig, EngineStats

logger = logging.getLogger("hybridserve")

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40,
}


def parse_bytes(text: str) -> int:
    """'1073741824', '2GiB', '512MB', '1.5G': SI suffixes are powers of 1000, `i` suffixes powers of 1024."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1073741824, 2GiB, 512MB)")
    return int(float(match.group(1)) * _UNITS[unit])


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def memory_summary(stats: EngineStats) -> list[str]:
    """The engine's memory by component, for the startup log: what each request costs and why concurrency is
    what it is."""
    kv_total = stats.kv_pages_total * stats.kv_page_bytes
    lines = [
        f"weights: {human_bytes(stats.weights_bytes)}",
        f"KV cache: {stats.kv_pages_total} pages x {human_bytes(stats.kv_page_bytes)} = {human_bytes(kv_total)}",
    ]
    for group, g in stats.state_groups.items():
        lines.append(f"state '{group}': {g.total} slots x {human_bytes(g.bytes_per_slot)} = "
                     f"{human_bytes(g.total * g.bytes_per_slot)}")
    lines.append(f"max concurrency: {stats.max_concurrency} requests")
    return lines


def log_loaded(engine) -> None:
    """The start-up log's lines about the loaded engine (an AsyncEngine)."""
    logger.info("loaded %r (max_model_len %d)", engine.model_name, engine.max_model_len)
    for line in memory_summary(engine.stats()):
        logger.info("  %s", line)


# ---- serve ---------------------------------------------------------------------------------------------------


def add_serve_command(subparsers: argparse._SubParsersAction) -> None:
    defaults = EngineConfig()
    p = subparsers.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    p.add_argument("--model", default=defaults.model,
                   help="checkpoint path, or 'embedded' for the packaged SmolLM2-135M-Instruct (default)")
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: from the checkpoint)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default=defaults.dtype, choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default=defaults.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs,
                   help="upper bound on concurrent requests (the memory budget may lower it)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--max-num-batched-tokens", type=int, default=defaults.max_num_batched_tokens,
                   help="token budget per engine step (the chunked-prefill size)")
    p.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                   help="bytes for KV pages + state slots, e.g. 2GiB or 512MB (default: from device memory)")
    p.add_argument("--page-size", type=int, default=defaults.page_size, help="tokens per KV page")
    p.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="launch each decode step before the host reads the previous step's tokens, so the "
                        "host's per-token work overlaps the GPU's (default: on when decode runs as CUDA graphs)")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                   help="run the engine core in its own process beside the HTTP server's, so the engine's and "
                        "the event loop's Python do not take turns on one interpreter lock (default: on for "
                        "CUDA, off elsewhere)")
    p.add_argument("--api-server-count", type=_positive_int, default=1,
                   help="API processes (HTTP, SSE, admission) in front of the one engine process, sharing the port: "
                        "one event loop is the limit past ~64 streams; more than 1 needs the engine process "
                        "(default 1)")
    p.add_argument("--gc-freeze", action=argparse.BooleanOptionalAction, default=True,
                   help="once warm, move the server process's start-up heap out of Python's garbage collector's "
                        "reach (gc.freeze), so a full collection does not stall every stream for 100+ ms "
                        "(default on)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="engine seed for unseeded requests")
    p.add_argument("--warmup", default=defaults.warmup, choices=["auto", "basic", "shapes"],
                   help="requests served before /health turns ready: 'shapes' meets the eagerly run step shapes "
                        "so their kernels compile at start, not in a user's request; 'basic' one token; 'auto' "
                        "(default) shapes on CUDA, basic elsewhere")
    # The default comes from the environment so the key need not appear in `ps`; never echo it in --help.
    p.add_argument("--api-key", default=os.environ.get("HYBRIDSERVE_API_KEY"),
                   help="require 'Authorization: Bearer <key>' on /v1/* (also env HYBRIDSERVE_API_KEY)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"],
                   help="the server's event loop, as uvicorn's --loop: auto takes uvloop where it is installed")
    p.add_argument("--http", default="auto", choices=["auto", "h11", "httptools"],
                   help="the server's HTTP implementation, as uvicorn's --http: auto takes httptools (a dependency) "
                        "where it is installed, whose framing of each streamed event costs the event loop less "
                        "than h11's")
    g = p.add_argument_group("admission, limits and lifecycle")
    g.add_argument("--max-queued-requests", type=_positive_int, default=defaults.max_queued_requests,
                   help="requests submitted but not yet running; beyond this, 503 with Retry-After")
    g.add_argument("--max-queued-tokens", type=_positive_int, default=defaults.max_queued_tokens,
                   help="prompt tokens of those queued requests; beyond this, 503 with Retry-After")
    g.add_argument("--max-request-bytes", type=parse_bytes, default=1 << 20,
                   help="largest request body, e.g. 1MiB (default); larger ones get 413")
    g.add_argument("--request-timeout", type=_non_negative_float, default=defaults.request_timeout,
                   help="seconds a request may take from arrival to its last token (0 = no limit); a request's "
                        "own 'timeout' field may only shorten it. Non-streaming: 504; streaming: in-band error")
    g.add_argument("--watchdog-timeout", type=_non_negative_float, default=defaults.watchdog_timeout,
                   help="an engine step running longer than this many seconds fails its requests and turns "
                        "/health to 503 for good, so the orchestrator restarts the server (0 = off)")
    g.add_argument("--shutdown-timeout", type=_non_negative_float, default=30.0,
                   help="on SIGTERM: seconds in-flight requests may finish before they are ended with an error")
    p.set_defaults(func=run_serve)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def use_engine_process(choice: bool | None, device: str) -> bool:
    """--engine-process as given, else on where the engine runs on CUDA."""
    if choice is not None:
        return choice
    from hybridserve.engine.build import resolve_device

    return resolve_device(device).type == "cuda"


def run_serve(args: argparse.Namespace) -> None:
    from hybridserve.engine.async_engine import AsyncEngine
    from hybridserve.engine.build import build_engine
    from hybridserve.server.app import create_app
    from hybridserve.server.runtime import serve

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = EngineConfig(
        model=args.model, served_model_name=args.served_model_name, dtype=args.dtype, device=args.device,
        max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory=args.kv_cache_memory,
        page_size=args.page_size, enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling, seed=args.seed, warmup=args.warmup,
        max_queued_requests=args.max_queued_requests, max_queued_tokens=args.max_queued_tokens,
        request_timeout=args.request_timeout, watchdog_timeout=args.watchdog_timeout,
    )

    if args.api_server_count > 1:
        if args.engine_process is False:
            raise SystemExit("--api-server-count above 1 needs the engine process (drop --no-engine-process)")
        from hybridserve.server.api_servers import ApiSettings, serve_api_processes

        settings = ApiSettings(args.api_key or None, args.max_request_bytes, args.gc_freeze, args.log_level,
                               args.shutdown_timeout, args.loop, args.http)
        raise SystemExit(serve_api_processes(settings, config, args.api_server_count, args.host, args.port))

    def load() -> AsyncEngine:
        if use_engine_process(args.engine_process, config.device):
            from hybridserve.engine.core_process import start_engine_process

            core = start_engine_process(config, args.log_level)
            engine = AsyncEngine(core, core.model_name, gc_freeze=args.gc_freeze)
            logger.info("engine process %d started", core.pid)
        else:
            engine = build_engine(config, gc_freeze=args.gc_freeze)
        log_loaded(engine)
        return engine

    # The port opens first and the weights load behind it: /health answers 503 until the warm-up is done.
    app = create_app(load=load, api_key=args.api_key or None, max_request_bytes=args.max_request_bytes)
    raise SystemExit(serve(app, args.host, args.port, args.log_level, args.shutdown_timeout, args.loop,
                           args.http))


# ---- inspect / synth -----------------------------------------------------------------------------------------


def add_inspect_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("inspect", help="check a checkpoint against its architecture's tensor table")
    p.add_argument("path", help="checkpoint directory or file, or 'embedded'")
    p.set_defaults(func=run_inspect)


def run_inspect(args: argparse.Namespace) -> None:
    from hybridserve.server.inspect_cmd import inspect_checkpoint
    from hybridserve.weights.checkpoint import CheckpointError

    try:
        ok, text = inspect_checkpoint(args.path)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(text)
    raise SystemExit(0 if ok else 1)


def add_synth_command(subparsers: argparse._SubParsersAction) -> None:
    from hybridserve.weights.synth import GENERATORS

    p = subparsers.add_parser("synth", help="write a random-weight checkpoint of an architecture in its real format")
    p.add_argument("--arch", required=True, choices=sorted(GENERATORS))
    p.add_argument("--size", default="tiny", choices=["tiny", "full"])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_synth)


def run_synth(args: argparse.Namespace) -> None:
    from hybridserve.weights.synth import write_synthetic

    out = write_synthetic(args.arch, args.size, args.out, args.seed)
    print(f"wrote {args.arch} ({args.size}) to {out}")


# ---- entry point ---------------------------------------------------------------------------------------------

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_serve_command, add_inspect_command,
                                                                 add_synth_command]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hybridserve", description="Inference server for recurrent and hybrid LMs")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(subparsers)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
