"""Request validation and error mapping, without a model: pydantic models directly, and the app over a tiny
scripted engine (ASGI in-process) for the HTTP status codes, error bodies, auth and in-band stream errors."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from hybridserve.engine.config import EngineStats, StateGroupStats
from hybridserve.engine.request import FinishReason, RequestOutput
from hybridserve.server.app import create_app
from hybridserve.server.cli import memory_summary, parse_bytes
from hybridserve.server.errors import describe_validation_errors
from hybridserve.server.protocol import ChatCompletionRequest, CompletionRequest

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


# ---- the app over a scripted engine ------------------------------------------------------------------------


class _Tokenizer:
    """One token per character (ids = code points), enough to exercise the app."""

    vocab_size = 256
    eos_token_ids = [0]

    def encode(self, text, add_special_tokens=False, allow_special=True):
        return [ord(c) % 256 for c in text]

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return self.encode("".join(m["content"] for m in messages))


class ScriptedEngine:
    """Echoes the prompt back one character per step. After `fail_after` steps it reports an engine error;
    with `reject` it refuses every request the way the engine's validation does (ValueError)."""

    model_name = "scripted"
    max_model_len = 64

    def __init__(self, fail_after: int | None = None, reject: str | None = None):
        self.tokenizer = _Tokenizer()
        self.ready = False
        self.fail_after = fail_after
        self.reject = reject
        self.live: set[str] = set()

    async def start(self):
        self.ready = True

    async def shutdown(self):
        self.ready = False

    async def generate(self, request_id, prompt_token_ids, params):
        if self.reject:
            raise ValueError(self.reject)
        self.live.add(request_id)
        try:
            for step in range(params.max_tokens):
                await asyncio.sleep(0)
                if self.fail_after is not None and step == self.fail_after:
                    yield RequestOutput(request_id, [], "", finished=True, finish_reason=FinishReason.ERROR,
                                        error="device fault")
                    return
                tok = prompt_token_ids[step % len(prompt_token_ids)]
                last = step == params.max_tokens - 1
                yield RequestOutput(request_id, [tok], chr(tok), finished=last,
                                    finish_reason=FinishReason.LENGTH if last else None,
                                    num_prompt_tokens=len(prompt_token_ids), num_output_tokens=step + 1,
                                    state_bytes=10, kv_bytes=100)
        finally:
            self.live.discard(request_id)

    async def abort(self, request_id):
        self.live.discard(request_id)

    def stats(self):
        return EngineStats(num_running=len(self.live), num_waiting=0, kv_pages_used=0, kv_pages_total=4,
                           kv_page_bytes=1024, state_groups={}, weights_bytes=1, num_preemptions=0,
                           max_concurrency=4)


async def _call(engine, method, path, api_key=None, **kwargs):
    app = create_app(engine, api_key=api_key)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.request(method, path, **kwargs)


def call(method, path, engine=None, **kwargs):
    return asyncio.run(_call(engine or ScriptedEngine(), method, path, **kwargs))


def assert_error(response, status, code=None, contains=""):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert contains in err["message"]
    if code is not None:
        assert err["code"] == code
    return err


def test_malformed_json_is_400():
    r = call("POST", "/v1/chat/completions", content=b'{"model": "scripted", "messages": [',
             headers={"content-type": "application/json"})
    assert_error(r, 400, contains="not valid JSON")


def test_missing_body_and_wrong_type_are_400():
    assert_error(call("POST", "/v1/chat/completions"), 400, contains="body is missing")
    assert_error(call("POST", "/v1/completions", json=[1, 2]), 400)


def test_nan_in_raw_json_is_400():
    r = call("POST", "/v1/chat/completions", headers={"content-type": "application/json"},
             content=b'{"model": "scripted", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}')
    err = assert_error(r, 400, contains="temperature: Input should be a finite number")
    assert err["type"] == "invalid_request_error" and err["param"] == "temperature"


def test_unknown_model_is_404():
    r = call("POST", "/v1/chat/completions", json={"model": "gpt-9", "messages": MSGS})
    err = assert_error(r, 404, code="model_not_found", contains="gpt-9")
    assert err["type"] == "NotFoundError"


def test_unknown_route_is_openai_404():
    assert_error(call("GET", "/v1/nothing"), 404, contains="Invalid URL")


def test_context_length_message_has_the_numbers():
    r = call("POST", "/v1/completions", json={"model": "scripted", "prompt": "x" * 60, "max_tokens": 10})
    assert_error(r, 400, code="context_length_exceeded",
                 contains="maximum context length is 64 tokens. However, you requested 70 tokens (60 in the prompt, "
                          "10 in the completion)")


def test_token_ids_outside_vocab_are_400():
    r = call("POST", "/v1/completions", json={"model": "scripted", "prompt": [1, 999]})
    assert_error(r, 400, contains="token id 999")


def test_default_max_tokens_fills_the_context():
    r = call("POST", "/v1/chat/completions", json={"model": "scripted", "messages": [{"role": "user", "content": "a" * 60}]})
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] == 4


def test_not_ready_is_503():
    engine = ScriptedEngine()

    async def run():
        app = create_app(engine)  # lifespan not run: the engine never started
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return (await client.get("/health"),
                    await client.post("/v1/completions", json={"model": "scripted", "prompt": "x"}))

    health, completion = asyncio.run(run())
    assert_error(health, 503)
    assert_error(completion, 503)
    assert completion.headers["retry-after"]


def test_api_key():
    body = {"model": "scripted", "prompt": "ab", "max_tokens": 2}
    assert_error(call("POST", "/v1/completions", api_key="k", json=body), 401, code="invalid_api_key")
    assert_error(call("GET", "/v1/models", api_key="k", headers={"authorization": "Bearer nope"}), 401)
    ok = call("POST", "/v1/completions", api_key="k", json=body, headers={"authorization": "Bearer k"})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "ab"
    assert call("GET", "/health", api_key="k").status_code == 200


def test_n_choices_and_usage_memory_sum():
    r = call("POST", "/v1/completions", json={"model": "scripted", "prompt": ["ab", "cd"], "n": 2, "max_tokens": 3})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == ["aba", "aba", "cdc", "cdc"]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 12, "total_tokens": 16,
                             "memory": {"state_bytes": 40, "kv_bytes": 400}}


def test_engine_error_is_500_without_traceback():
    r = call("POST", "/v1/completions", engine=ScriptedEngine(fail_after=1), json={"model": "scripted", "prompt": "ab"})
    err = assert_error(r, 500, contains="device fault")
    assert "Traceback" not in err["message"]


def test_engine_error_mid_stream_is_in_band():
    engine = ScriptedEngine(fail_after=2)
    r = call("POST", "/v1/chat/completions", engine=engine,
             json={"model": "scripted", "messages": MSGS, "stream": True, "max_tokens": 5})
    assert r.status_code == 200
    events = [line.removeprefix("data: ") for line in r.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["message"] == "device fault"
    assert engine.live == set()


def test_engine_refusal_is_400():
    engine = ScriptedEngine(reject="the request needs 60 tokens of KV cache; the pool holds 32")
    body = {"model": "scripted", "prompt": "ab", "max_tokens": 2}
    assert_error(call("POST", "/v1/completions", engine=engine, json=body), 400, contains="pool holds 32")
    r = call("POST", "/v1/completions", engine=engine, json=body | {"stream": True})
    events = [line.removeprefix("data: ") for line in r.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "invalid_request_error"


def test_metrics_exposition_names():
    r = call("GET", "/metrics")
    for name in ("hybridserve:num_requests_running", "hybridserve:kv_cache_usage_perc",
                 "hybridserve:num_preemptions_total", "hybridserve:prompt_tokens_total",
                 "hybridserve:request_success_total", 'hybridserve:memory_bytes{component="kv_total"'):
        assert name in r.text
