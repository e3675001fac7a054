"""Preemption under a deliberately tiny KV pool: preempted requests are swapped to host and resumed, and
their greedy output is identical to an unpreempted run."""
from __future__ import annotations

import pytest

from hybridserve.engine.build import build_llm_engine
from hybridserve.engine.config import EngineConfig
from hybridserve.engine.request import SamplingParams
from hybridserve.weights.synth import write_synthetic

ARCHS = ["llama", "neollm", "nanohammer"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt")
    return {a: write_synthetic(a, "tiny", root / a, seed=3) for a in ARCHS}


def run_all(path, num_pages: int | None, prompts, max_tokens: int):
    engine, _ = build_llm_engine(EngineConfig(model=str(path), device="cpu", dtype="float32", page_size=4,
                                              kv_cache_memory=64 << 20, num_kv_pages=num_pages, max_num_seqs=8,
                                              max_num_batched_tokens=64))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    tokens = {str(i): [] for i in range(len(prompts))}
    while engine.has_work():
        for o in engine.step():
            assert o.error is None, o.error
            tokens[o.request_id] += o.new_token_ids
    stats = engine.stats()
    assert stats.kv_pages_used == 0 and all(g.used == 0 for g in stats.state_groups.values())
    return tokens, stats.num_preemptions


@pytest.mark.parametrize("arch", ARCHS)
def test_preempted_requests_finish_identically(checkpoints, arch):
    prompts = [[(13 * i + 7 * j) % 4000 + 5 for j in range(20 + 9 * i)] for i in range(6)]
    big, n_big = run_all(checkpoints[arch], None, prompts, 24)
    assert n_big == 0
    # 40 pages of 4 tokens hold about two of these requests: the rest must be preempted and resumed
    small, n_small = run_all(checkpoints[arch], 40, prompts, 24)
    assert n_small > 0, "the tiny pool should have forced preemptions"
    assert small == big
