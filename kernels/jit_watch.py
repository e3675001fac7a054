"""Triton JIT compiles as they happen: which kernel, which specialisation (argument types, divisibility,
constexprs, launch options) and how long. A variant first met while serving is compiled inside somebody's
request (0.1-1 s each on a machine with an empty Triton cache, seconds for a burst), so the server counts
the ones that happen after it turned ready (`hybridserve:jit_compiles_after_ready_total`) and logs each, and
the tests and benches use the same record to show that the start-up warm-up leaves none.

Built on Triton's runtime hooks (`triton.knobs.runtime.jit_cache_hook` before a compile and
`jit_post_compile_hook` after it, Triton 3.4 and newer); where they are missing, `available()` is False and
nothing is recorded. Previously installed hooks keep being called."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass
class Compile:
    kernel: str        # the @triton.jit function's name
    variant: str       # Triton's description of the specialisation compiled
    seconds: float     # wall time from the cache hook to the post-compile hook (includes a disk-cache load)


def _knobs():
    try:
        from triton import knobs
    except ImportError:
        return None
    runtime = getattr(knobs, "runtime", None)
    if runtime is None or not hasattr(runtime, "jit_post_compile_hook"):
        return None
    return runtime


def describe(compile_info: dict) -> str:
    """One line per variant: each argument's type (`/16`: specialised as divisible by 16) or constexpr value,
    then the launch options; Triton's own description where the hook's details are not in this form."""
    try:
        sig = compile_info["signature"]
        constants = compile_info.get("constants") or {}
        attrs = (compile_info.get("configs") or [{}])[0] or {}
        parts = []
        for i, (name, ty) in enumerate(sig.items()):
            if ty == "constexpr":
                parts.append(f"{name}={constants.get((i,), constants.get(name, '?'))}")
            else:
                aligned = any("divisib" in str(a) for a in attrs.get((i,), ()))
                parts.append(f"{name}:{ty}{'/16' if aligned else ''}")
        return (f"({', '.join(parts)}) num_warps={compile_info.get('num_warps')} "
                f"num_stages={compile_info.get('num_stages')}")
    except Exception:   # another Triton's layout: fall back to the caller's text
        return ""


def available() -> bool:
    return _knobs() is not None


def forget_compiled() -> int:
    """Drop the compiled variants every loaded Triton JIT function holds in this process, as a fresh process
    starts (the on-disk cache stays): tests that build several engines in one process use it so one
    engine's compiles do not hide another's. Returns how many functions were cleared."""
    import gc

    from triton.runtime.jit import JITFunction

    cleared = 0
    for obj in gc.get_objects():
        if issubclass(type(obj), JITFunction):   # type(): no attribute lookups on arbitrary objects
            caches = getattr(obj, "device_caches", None)
            if caches is None:
                caches = getattr(obj, "cache", None)
            if caches is not None:
                caches.clear()
                cleared += 1
    return cleared


class JitWatch:
    """Records every Triton compile in this process between `start()` and `stop()`.

    `on_compile(Compile)`, if given, is called from the compiling thread right after each one."""

    def __init__(self, on_compile=None):
        self.compiles: list[Compile] = []
        self.on_compile = on_compile
        self._lock = threading.Lock()
        self._begun: dict[tuple[int, str], float] = {}
        self._prev: tuple | None = None    # the hooks ours replaced, while started
        self._hooks: tuple | None = None   # ours

    def start(self) -> "JitWatch":
        runtime = _knobs()
        if runtime is None or self._prev is not None:
            return self
        prev_cache, prev_post = runtime.jit_cache_hook, runtime.jit_post_compile_hook
        self._prev = (prev_cache, prev_post)

        def cache_hook(*args, **kwargs):
            self._begun[(threading.get_ident(), kwargs.get("repr", ""))] = time.monotonic()
            # A true return from this hook tells Triton to skip the compile: pass on only the earlier hook's.
            return prev_cache(*args, **kwargs) if prev_cache is not None else None

        def post_hook(*args, **kwargs):
            key = kwargs.get("repr", "")
            now = time.monotonic()
            begun = self._begun.pop((threading.get_ident(), key), now)
            fn = kwargs.get("fn")
            name = getattr(fn, "name", None) or key.split("[", 1)[0]
            variant = describe(kwargs.get("compile") or {}) or key
            record = Compile(kernel=name.rsplit(".", 1)[-1], variant=variant, seconds=now - begun)
            with self._lock:
                self.compiles.append(record)
            if self.on_compile is not None:
                self.on_compile(record)
            return prev_post(*args, **kwargs) if prev_post is not None else None

        runtime.jit_cache_hook, runtime.jit_post_compile_hook = cache_hook, post_hook
        self._hooks = (cache_hook, post_hook)
        return self

    def stop(self) -> None:
        runtime = _knobs()
        if runtime is None or self._prev is None:
            return
        # Put the earlier hooks back only if nobody has replaced ours since.
        if (runtime.jit_cache_hook, runtime.jit_post_compile_hook) == self._hooks:
            runtime.jit_cache_hook, runtime.jit_post_compile_hook = self._prev
        self._prev = None

    def since(self, mark: int) -> list[Compile]:
        """The compiles recorded after the first `mark` (a `len(watch.compiles)` taken earlier)."""
        with self._lock:
            return list(self.compiles[mark:])
