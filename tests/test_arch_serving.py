"""Every architecture end to end: `hybridserve synth` → `hybridserve serve` → chat over HTTP, with the
state slots and KV pages back at zero afterwards; per-request memory constant in context length."""
from __future__ import annotations

import re
import subprocess
import sys
import time

import httpx
import pytest
import torch

from hybridserve.engine.build import build_llm_engine
from hybridserve.engine.config import EngineConfig
from hybridserve.engine.request import SamplingParams
from server_process import running_server

ARCHS = ["llama", "kotodama", "spartacus", "neollm", "nanohammer"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    out = {}
    for arch in ARCHS:
        d = root / arch
        subprocess.run([sys.executable, "-m", "hybridserve.server.cli", "synth", "--arch", arch, "--size", "tiny",
                        "--out", str(d)], check=True, capture_output=True)
        out[arch] = d
    return out


def metric(text: str, name: str) -> list[float]:
    return [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)]


@pytest.mark.parametrize("arch", ARCHS)
def test_synth_serve_chat(checkpoints, arch):
    with running_server("--model", str(checkpoints[arch]), "--device", "cpu", "--dtype", "float32",
                        "--kv-cache-memory", "64MiB", "--max-num-seqs", "4", "--log-level", "warning") as (url, _):
        with httpx.Client(base_url=url, timeout=60) as c:
            name = c.get("/v1/models").json()["data"][0]["id"]
            body = {"model": name, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 12,
                    "temperature": 0}
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["choices"][0]["message"]["role"] == "assistant"
            assert out["usage"]["completion_tokens"] >= 1
            mem = out["usage"]["memory"]
            if arch in ("spartacus", "neollm", "nanohammer"):
                assert mem["state_bytes"] > 0
            if arch == "spartacus":
                assert mem["kv_bytes"] == 0
            with c.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as s:
                lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
            assert lines[-1] == "data: [DONE]"
            deadline = time.monotonic() + 10
            while True:
                m = c.get("/metrics").text
                used = metric(m, "hybridserve:state_slots_used") + metric(m, "hybridserve:kv_pages_used")
                running = metric(m, "hybridserve:num_requests_running")
                if all(v == 0 for v in used + running) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert all(v == 0 for v in used), m
            if arch in ("spartacus", "neollm", "nanohammer"):
                assert metric(m, "hybridserve:state_slots_total") and min(metric(m, "hybridserve:state_slots_total")) > 0


def memory_at(engine, n_tokens: int):
    """(state_bytes, kv_bytes) a request reports after a prompt of n_tokens."""
    ids = [(7 * i) % 1000 + 10 for i in range(n_tokens)]
    engine.add_request(f"m{n_tokens}", ids, SamplingParams(max_tokens=1, temperature=0))
    outs = []
    while engine.has_work():
        outs += engine.step()
    return outs[-1].state_bytes, outs[-1].kv_bytes


@pytest.mark.parametrize("arch,short,long", [("spartacus", 10, 2000), ("neollm", 10, 400), ("nanohammer", 10, 400)])
def test_memory_per_request_is_state_plus_attention_pages(checkpoints, arch, short, long):
    engine, _ = build_llm_engine(EngineConfig(model=str(checkpoints[arch]), device="cpu", dtype="float32",
                                              kv_cache_memory=64 << 20, max_num_seqs=2))
    s1, kv1 = memory_at(engine, short)
    s2, kv2 = memory_at(engine, long)
    assert s1 == s2 == engine.pools.state_bytes_per_request() > 0
    layout = engine.model.cache_layout()
    if layout.kv is None:
        assert kv1 == kv2 == 0
    else:
        per_token = layout.kv_bytes_per_token(torch.float32)
        page = engine.pools.page_size
        assert kv1 == -(-short // page) * page * per_token
        assert kv2 == -(-long // page) * page * per_token
        # only the attention layers hold KV
        assert layout.kv.num_layers < engine.model.config.num_layers or arch == "nanohammer"
