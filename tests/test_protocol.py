"""Request validation and error mapping: pydantic models directly, then the app in-process (ASGI) over a real
AsyncEngine and a tiny random-weight model for the HTTP status codes, error bodies, limits and auth.

No scripted engine: every failure here is a real one. The engine faults that cannot be produced on demand
(a stuck step) are covered with a real slow step in test_async_engine.py."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from hybridserve.engine.config import EngineStats, StateGroupStats
from hybridserve.server.app import create_app
from hybridserve.server.cli import memory_summary, parse_bytes
from hybridserve.server.errors import describe_validation_errors
from hybridserve.server.protocol import ChatCompletionRequest, CompletionRequest

from tiny import async_engine, prompt_ids, synth, wait_until

MSGS = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return ChatCompletionRequest.model_validate({"model": "m", "messages": MSGS} | fields)


def errors_of(cls, body):
    with pytest.raises(Exception) as info:
        cls.model_validate(body)
    return describe_validation_errors(info.value.errors())


# ---- pydantic models ------------------------------------------------------------------------------------


def test_defaults_map_to_sampling_params():
    p = chat().sampling_params(max_tokens=7)
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.stop, p.logprobs) == (7, 1.0, 1.0, -1, [], False)


def test_explicit_nulls_mean_defaults():
    p = chat(temperature=None, top_p=None, n=None, presence_penalty=None).sampling_params(4)
    assert (p.temperature, p.top_p, p.presence_penalty) == (1.0, 1.0, 0.0)


def test_stop_string_becomes_list_and_extras_are_kept():
    req = chat(stop="\n", top_k=5, min_p=0.1, unknown_field=1)
    p = req.sampling_params(4)
    assert (p.stop, p.top_k, p.min_p) == (["\n"], 5, 0.1)
    assert req.model_extra == {"unknown_field": 1}


def test_max_completion_tokens_wins_over_max_tokens():
    assert chat(max_tokens=5, max_completion_tokens=9).requested_max_tokens == 9


def test_content_parts_are_joined():
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert req.messages[0].text == "ab"


@pytest.mark.parametrize("fields, expected", [
    ({"temperature": 3}, "temperature: Input should be less than or equal to 2"),
    ({"temperature": float("nan")}, "temperature: Input should be a finite number"),
    ({"top_p": 0}, "top_p: Input should be greater than 0"),
    ({"n": 17}, "n: Input should be less than or equal to 16"),
    ({"max_tokens": -1}, "max_tokens: Input should be greater than or equal to 1"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs: Input should be less than or equal to 20"),
    ({"top_logprobs": 2}, "top_logprobs requires logprobs to be true"),
    ({"stop": ["x"] * 17}, "stop: "),
    ({"stop": ["x" * 257]}, "stop.0: String should have at most 256 characters"),
    ({"timeout": 0}, "timeout: Input should be greater than 0"),
    ({"stop": 3}, "stop: must be a string or a list of strings"),
    ({"seed": 2**63}, "seed: Input should be less than or equal to"),
    ({"presence_penalty": -2.5}, "presence_penalty: Input should be greater than or equal to -2"),
    ({"repetition_penalty": 0}, "repetition_penalty: Input should be greater than 0"),
    ({"stream_options": {"include_usage": True}}, "stream_options is only allowed when stream is true"),
    ({"messages": []}, "messages: List should have at least 1 item"),
    ({"messages": [{"role": "user"}]}, "messages.0: content is required for role 'user'"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role: Input should be"),
])
def test_chat_validation_messages_name_the_field(fields, expected):
    message, _ = errors_of(ChatCompletionRequest, {"model": "m", "messages": MSGS} | fields)
    assert message.startswith(expected)
    assert "loc" not in message and "http" not in message and "Value error" not in message


@pytest.mark.parametrize("prompt, expected", [
    ("hi", [["hi"][0]]), (["a", "b"], ["a", "b"]), ([1, 2], [[1, 2]]), ([[1], [2, 3]], [[1], [2, 3]]),
])
def test_completion_prompt_shapes(prompt, expected):
    assert CompletionRequest.model_validate({"model": "m", "prompt": prompt}).prompt == expected


@pytest.mark.parametrize("body, expected", [
    ({"prompt": []}, "prompt: must not be empty"),
    ({"prompt": [1, "a"]}, "prompt: must be a string"),
    ({"prompt": [[]]}, "prompt: must not contain an empty list"),
    ({"prompt": "x", "echo": True}, "echo is not supported"),
    ({"prompt": "x", "logprobs": 6}, "logprobs: Input should be less than or equal to 5"),
])
def test_completion_validation(body, expected):
    message, _ = errors_of(CompletionRequest, {"model": "m"} | body)
    assert message.startswith(expected)


def test_completion_defaults():
    req = CompletionRequest.model_validate({"model": "m", "prompt": "x", "logprobs": 0})
    assert req.requested_max_tokens == 16
    assert req.logprob_settings() == (True, 0)


def test_parse_bytes():
    assert parse_bytes("1024") == 1024
    assert parse_bytes("2GiB") == 2 * 2**30
    assert parse_bytes("512MB") == 512 * 10**6
    assert parse_bytes("1.5 Gi") == int(1.5 * 2**30)
    with pytest.raises(Exception):
        parse_bytes("lots")


def test_memory_summary_lists_every_component():
    stats = EngineStats(num_running=0, num_waiting=0, kv_pages_used=0, kv_pages_total=100, kv_page_bytes=2**20,
                        state_groups={"gdn": StateGroupStats(used=0, total=8, bytes_per_slot=3 * 2**20)},
                        weights_bytes=5 * 2**30, num_preemptions=0, max_concurrency=8)
    text = "\n".join(memory_summary(stats))
    assert "5.0 GiB" in text and "100 pages x 1.0 MiB" in text and "'gdn': 8 slots x 3.0 MiB" in text
    assert "max concurrency: 8" in text


# ---- the app in-process over a real engine ------------------------------------------------------------------

MAX_LEN = 64


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return synth("llama", tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def engine(model):
    return async_engine(model, max_model_len=MAX_LEN)


@pytest.fixture(scope="module")
def small_pool(model):
    """KV for a few pages of 16 tokens under a 2,048-token context: some requests can never fit."""
    return async_engine(model, kv_cache_memory=32 << 10)


async def _call(engine, method, path, *, app_options=None, **kwargs):
    app = create_app(engine, **(app_options or {}))
    async with app.router.lifespan_context(app):
        await wait_until(lambda: engine.health() is None)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as client:
            return await client.request(method, path, **kwargs)


def call(engine, method, path, **kwargs):
    return asyncio.run(_call(engine, method, path, **kwargs))


def post(engine, path, body, **kwargs):
    return call(engine, "POST", path, json={"model": engine.model_name} | body, **kwargs)


def assert_error(response, status, code=None, contains=""):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert contains in err["message"]
    if code is not None:
        assert err["code"] == code
    return err


def sse_events(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [e.removeprefix("data: ") for e in response.text.split("\n\n") if e]


def test_malformed_json_is_400(engine):
    r = call(engine, "POST", "/v1/chat/completions", content=b'{"model": "llama", "messages": [',
             headers={"content-type": "application/json"})
    assert_error(r, 400, contains="not valid JSON")


def test_missing_body_and_wrong_type_are_400(engine):
    assert_error(call(engine, "POST", "/v1/chat/completions"), 400, contains="body is missing")
    assert_error(call(engine, "POST", "/v1/completions", json=[1, 2]), 400)


def test_nan_in_raw_json_is_400(engine):
    r = call(engine, "POST", "/v1/chat/completions", headers={"content-type": "application/json"},
             content=b'{"model": "llama", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}')
    err = assert_error(r, 400, contains="temperature: Input should be a finite number")
    assert err["type"] == "invalid_request_error" and err["param"] == "temperature"


def test_unknown_model_is_404(engine):
    r = call(engine, "POST", "/v1/chat/completions", json={"model": "gpt-9", "messages": MSGS})
    err = assert_error(r, 404, code="model_not_found", contains="gpt-9")
    assert err["type"] == "NotFoundError"


def test_unknown_route_is_openai_404(engine):
    assert_error(call(engine, "GET", "/v1/nothing"), 404, contains="Invalid URL")


def test_context_length_message_has_the_numbers(engine):
    r = post(engine, "/v1/completions", {"prompt": prompt_ids(60), "max_tokens": 10})
    assert_error(r, 400, code="context_length_exceeded",
                 contains="maximum context length is 64 tokens. However, you requested 70 tokens (60 in the prompt, "
                          "10 in the completion)")


def test_token_ids_outside_vocab_are_400(engine):
    assert_error(post(engine, "/v1/completions", {"prompt": [1, 99999]}), 400, contains="token id 99999")


def test_default_max_tokens_fills_the_context(engine):
    r = post(engine, "/v1/completions", {"prompt": prompt_ids(60), "max_tokens": None, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4


def test_not_ready_is_503(engine):
    async def run():
        app = create_app(engine)  # lifespan not run: the engine never started
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return (await client.get("/health"),
                    await client.post("/v1/completions", json={"model": engine.model_name, "prompt": "x"}))

    health, completion = asyncio.run(run())
    assert_error(health, 503)
    assert_error(completion, 503)
    assert completion.headers["retry-after"]


def test_api_key(engine):
    opts = {"app_options": {"api_key": "k"}}
    body = {"model": engine.model_name, "prompt": "ab", "max_tokens": 2}
    assert_error(call(engine, "POST", "/v1/completions", json=body, **opts), 401, code="invalid_api_key")
    assert_error(call(engine, "GET", "/v1/models", headers={"authorization": "Bearer nope"}, **opts), 401)
    assert_error(call(engine, "GET", "/v1/nothing", **opts), 401)   # unknown /v1 routes too
    ok = call(engine, "POST", "/v1/completions", json=body, headers={"authorization": "bearer k"}, **opts)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    assert call(engine, "GET", "/health", **opts).status_code == 200


def test_body_size_limit_is_413(engine):
    opts = {"app_options": {"max_request_bytes": 1000}}
    big = {"model": engine.model_name, "prompt": "x" * 2000}
    err = assert_error(call(engine, "POST", "/v1/completions", json=big, **opts), 413, code="request_too_large")
    assert "1000 bytes" in err["message"]

    async def chunks():  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"x" * 100
        yield b'"}'

    r = call(engine, "POST", "/v1/completions", content=chunks(), headers={"content-type": "application/json"},
             **opts)
    assert_error(r, 413, code="request_too_large")
    ok = call(engine, "POST", "/v1/completions", json={"model": engine.model_name, "prompt": "hi", "max_tokens": 1},
              **opts)
    assert ok.status_code == 200


def test_too_many_generations_is_400(engine):
    r = post(engine, "/v1/completions", {"prompt": ["a"] * 5, "n": 16})
    assert_error(r, 400, contains="80 generations")


def test_n_choices_and_usage_memory_sum(engine):
    r = post(engine, "/v1/completions", {"prompt": [prompt_ids(2), prompt_ids(2, 1)], "n": 2, "max_tokens": 3,
                                         "ignore_eos": True})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(c["finish_reason"] == "length" for c in body["choices"])
    usage = body["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (4, 12, 16)
    page_bytes = engine.stats().kv_page_bytes
    assert usage["memory"] == {"state_bytes": 0, "kv_bytes": 4 * page_bytes}   # 5 tokens: one page per choice


def test_engine_refusal_is_400_also_for_streams(small_pool):
    """The engine's own validation (KV for the whole request exceeds the pool) runs before any response
    starts, so a stream is refused with a real 400, not a 200 with an in-band error."""
    body = {"prompt": prompt_ids(100), "max_tokens": 10}
    assert_error(post(small_pool, "/v1/completions", body), 400, contains="tokens of KV cache; the pool holds")
    assert_error(post(small_pool, "/v1/completions", body | {"stream": True}), 400, contains="tokens of KV cache; the pool holds")


def test_request_timeout_is_504_or_in_band(engine):
    body = {"prompt": prompt_ids(4), "max_tokens": 60, "ignore_eos": True, "timeout": 0.05}
    err = assert_error(post(engine, "/v1/completions", body), 504, code="request_timeout")
    assert err["type"] == "timeout"
    events = sse_events(post(engine, "/v1/completions", body | {"stream": True}))
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "timeout"


def test_metrics_exposition_names(engine):
    r = call(engine, "GET", "/metrics")
    for name in ("hybridserve:num_requests_running", "hybridserve:num_requests_inflight",
                 "hybridserve:kv_cache_usage_perc", "hybridserve:num_preemptions_total",
                 "hybridserve:prompt_tokens_total", "hybridserve:request_success_total",
                 'hybridserve:memory_bytes{component="kv_total"'):
        assert name in r.text


def test_model_sampling_defaults_fill_only_omitted_fields():
    from hybridserve.server.protocol import ChatCompletionRequest

    msgs = [{"role": "user", "content": "hi"}]
    defaults = {"temperature": 0.2, "top_p": 0.9, "top_k": 40}
    p = ChatCompletionRequest(model="m", messages=msgs).sampling_params(8, defaults)
    assert (p.temperature, p.top_p, p.top_k) == (0.2, 0.9, 40)
    p = ChatCompletionRequest(model="m", messages=msgs, temperature=0, top_p=0.5).sampling_params(8, defaults)
    assert (p.temperature, p.top_p, p.top_k) == (0.0, 0.5, 40)
    p = ChatCompletionRequest(model="m", messages=msgs).sampling_params(8, None)
    assert (p.temperature, p.top_p, p.top_k) == (1.0, 1.0, -1)


TRICKY_TEXTS = [" hello", 'a "quote" and a \\ backslash', "new\nline\ttab\rreturn", "\x00\x01\x1f\x7f control",
                "é日本語🙂", "\u2028\u2029 separators", "</script>", "{\"not\": json}", ""]


def test_text_events_are_the_models_bytes():
    """The text-event template (server/sse.py) gives byte for byte what the response models render, for
    completions and chat chunks and texts that need escaping, non-ASCII and JSON look-alikes."""
    from hybridserve.server.protocol import ChatCompletionChunk, ChatStreamChoice, CompletionChoice, CompletionChunk
    from hybridserve.server.protocol import DeltaMessage
    from hybridserve.server.sse import TextEvents

    def completion(index, text):
        return "data: " + CompletionChunk(id="cmpl-1", created=7, model="m/x", system_fingerprint="fp", choices=[
            CompletionChoice(index=index, text=text)]).model_dump_json() + "\n\n"

    def chat(index, text):
        return "data: " + ChatCompletionChunk(id="chatcmpl-1", created=7, model="m", system_fingerprint="fp", choices=[
            ChatStreamChoice(index=index, delta=DeltaMessage(content=text))]).model_dump_json() + "\n\n"

    for render in (completion, chat):
        events = TextEvents(render)
        for index in (0, 2):
            for text in TRICKY_TEXTS:
                assert events(index, text) == render(index, text), text
    with pytest.raises(ValueError):
        TextEvents(lambda index, text: text + text)(0, "x")   # a render that repeats the text cannot be a template


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_streamed_events_same_with_or_without_text_templates(engine, path, monkeypatch):
    """A streamed response (two choices, a stop string, usage) has the same events whether its text events
    come from the template or from the models; only the response id and creation time differ."""
    import hybridserve.server.app as app_module
    body = {"max_tokens": 12, "n": 2, "temperature": 0.9, "seed": 5, "stop": ["qqqz"], "stream": True,
            "stream_options": {"include_usage": True}}
    body |= {"prompt": "Once upon"} if path == "/v1/completions" else {"messages": MSGS}
    runs = []
    for fast in (True, False):
        monkeypatch.setattr(app_module, "FAST_TEXT_EVENTS", fast)
        events = sse_events(post(engine, path, body))
        assert events[-1] == "[DONE]"
        runs.append([{k: v for k, v in json.loads(e).items() if k not in ("id", "created")} for e in events[:-1]])
    # the two choices' events interleave as the engine steps them (whether both were admitted in the same step
    # is timing), so each choice's events are compared in order
    by_choice = [sorted(r, key=lambda e: [c["index"] for c in e["choices"]] or [len(r)]) for r in runs]
    assert by_choice[0] == by_choice[1]
    assert sum(bool(c.get("text") or c.get("delta", {}).get("content")) for e in runs[0] for c in e["choices"]) > 6
