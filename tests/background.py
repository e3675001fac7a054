"""The Triton files' interpreter runs (triton_mode.fresh_process_test) as background processes.

Each such run is one single-threaded process of minutes. conftest.py starts the selected ones when collection
ends, one after another at a lower priority, so they use the core that the rest of the suite leaves idle
instead of adding their minutes to it; each test then waits for its own file's result. A run that was not
started there (a file run on its own, or with collection hooks bypassed) starts when its test asks for it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading

TIMEOUT = 1800   # s, a file's run from its start

_lock = threading.Lock()
_queue: list[str] = []
_done: dict[str, threading.Event] = {}
_results: dict[str, tuple[int, str]] = {}
_running: list[subprocess.Popen] = []
_worker: threading.Thread | None = None


def _command(path: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", path]


def _run(path: str) -> tuple[int, str]:
    env = dict(os.environ, TRITON_INTERPRET="1")
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(_command(path), env=env, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: os.nice(10))
        with _lock:
            _running.append(proc)
        try:
            code = proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        finally:
            with _lock:
                _running.remove(proc)
        log.seek(0)
        return code, log.read()[-6000:]


def _work() -> None:
    while True:
        with _lock:
            if not _queue:
                global _worker
                _worker = None
                return
            path = _queue.pop(0)
        try:
            _results[path] = _run(path)
        except Exception as exc:   # reported by the waiting test
            _results[path] = (-1, repr(exc))
        _done[path].set()


def start(paths: list[str]) -> None:
    """Queue these files' runs (each once) behind any queued before."""
    global _worker
    with _lock:
        for path in map(os.path.realpath, paths):
            if path not in _done:
                _done[path] = threading.Event()
                _queue.append(path)
        if _worker is None and _queue:
            _worker = threading.Thread(target=_work, name="interpreter-runs", daemon=True)
            _worker.start()


def result(path: str) -> tuple[int, str]:
    """(exit code, the output's tail) of the file's run; started now if it was not queued."""
    path = os.path.realpath(path)
    start([path])
    with _lock:     # not yet begun: move it to the front, the suite is waiting for it
        if path in _queue:
            _queue.remove(path)
            _queue.insert(0, path)
    _done[path].wait()
    return _results[path]


def stop() -> None:
    """Kill what still runs (the session ended early) and drop what is queued."""
    with _lock:
        _queue.clear()
        for proc in _running:
            proc.kill()
