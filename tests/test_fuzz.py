"""Fuzzing a real server process: schemathesis generates requests from the app's own OpenAPI schema (valid ones
and schema-violating ones, for every operation), hypothesis adds malformed HTTP (broken JSON, raw bytes,
deep nesting, wrong content types and methods, unknown paths). Over 1,000 requests in all.

Contract checked on every response: no 5xx, every error is an OpenAI error body, every 200 parses (JSON,
or SSE ending in [DONE]). Derandomized: the same requests on every run, so a CI failure reproduces.
"""
from __future__ import annotations

import json
from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from server_process import running_server
from tiny import serve_args, synth

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402
import requests  # noqa: E402  (a schemathesis dependency)

MAX_MODEL_LEN = 128
VOCAB = 49152  # the SmolLM2 tokenizer of the synthetic checkpoints
# Per operation and generation mode. Negative cases cost the client ~0.1 s each to generate, malformed ones
# almost nothing: the split keeps the whole file under a minute and a half on 2 shared cores.
SCHEMA_EXAMPLES = {("POST", "positive"): 200, ("POST", "negative"): 130, ("GET", "positive"): 25}
MALFORMED_EXAMPLES = 400
MIN_REQUESTS = 1000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = synth("llama", tmp_path_factory.mktemp("synth"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # tiny ops: OpenMP spinning on 2 shared cores only slows them down
        with running_server(*serve_args(model, "--max-model-len", str(MAX_MODEL_LEN))) as (url, _):
            yield url


class Ledger:
    """Every response's verdict; the test fails at the end with the first few violations, so one bad case
    does not hide the rest (and the request count stays fixed)."""

    def __init__(self) -> None:
        self.count = Counter()
        self.problems: list[str] = []

    def check(self, where: str, status: int, headers, content: bytes, sent: object) -> None:
        self.count[where] += 1
        problem = _violation(status, headers, content, sent)
        if problem is not None:
            self.problems.append(f"{where}: {problem}; sent {str(sent)[:300]!r}")


def _asked_for_timeout(sent: object) -> bool:
    return isinstance(sent, dict) and isinstance(sent.get("timeout"), (int, float))


def _violation(status: int, headers, content: bytes, sent: object) -> str | None:
    if status >= 500:
        # The one 5xx a well-behaved server gives to a valid request: the client's own deadline ran out
        # (a fuzzed `timeout` of 1e-300 s). It must still be the OpenAI timeout body.
        if not (status == 504 and _asked_for_timeout(sent)):
            return f"{status}: {content[:300]!r}"
    if status >= 400:
        try:
            error = json.loads(content)["error"]
        except (ValueError, KeyError, TypeError):
            return f"{status} without an OpenAI error body: {content[:300]!r}"
        if set(error) != {"message", "type", "param", "code"} or not isinstance(error["message"], str) \
                or not error["message"] or not isinstance(error["type"], str):
            return f"{status} error body not OpenAI-shaped: {error}"
        return None
    content_type = headers.get("content-type") or ""
    if isinstance(content_type, list):  # schemathesis' responses keep every value of a header
        content_type = content_type[0] if content_type else ""
    if content_type.startswith("text/event-stream"):
        blocks = [b for b in content.decode().split("\n\n") if b]
        if not blocks or blocks[-1] != "data: [DONE]" or not all(b.startswith("data: ") for b in blocks):
            return f"malformed SSE: {content[-300:]!r}"
        for block in blocks[:-1]:
            json.loads(block.removeprefix("data: "))
    elif content_type.startswith("application/json"):
        json.loads(content)
    return None


def _servable(name: str):
    """Make a schema-valid case one the server can run, so the generation path is fuzzed too, not only the
    400/404 paths: the served model's name (unknown names are covered by the negative cases), text in every
    message that needs some (the schema cannot say "required unless role is assistant"), token ids inside the
    vocabulary, and generations kept to a few tokens and at most 2 choices so the suite fits its time budget
    (lengths above the context stay: they test the 400 path at no cost)."""
    def fix(case):
        body = case.body
        if not isinstance(body, dict):
            return case
        body["model"] = name
        for message in body.get("messages") or []:
            if isinstance(message, dict) and message.get("content") is None and message.get("role") != "assistant":
                message["content"] = "hi"
        prompt = body.get("prompt")
        if prompt == "" or prompt == [""]:
            body["prompt"] = "hi"
        elif isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            body["prompt"] = [t % VOCAB for t in prompt]   # the schema cannot know the vocabulary size
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key)
            if type(value) is int and 0 < value <= MAX_MODEL_LEN:
                body[key] = min(value, 3)
        if type(body.get("n")) is int and body["n"] > 2:
            body["n"] = 2
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = 3
        return case

    return fix


def _run(strategy, examples: int, send) -> None:
    @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(strategy)
    def fuzz(item):
        send(item)

    fuzz()


def test_schema_driven_fuzz(server):
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    # Read every event stream to its end: newer schemathesis stops reading after 20 events by default, which
    # would hand the check a stream without its [DONE] (a streamed n > 4 has more).
    if hasattr(schema.config, "max_stream_events"):
        schema.config.max_stream_events = 100_000
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} == {
        ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/health"),
        ("GET", "/metrics")}
    ledger = Ledger()
    session = requests.Session()
    name = session.get(f"{server}/v1/models").json()["data"][0]["id"]
    for op in operations:
        method = op.method.upper()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if method == "GET" and mode is GenerationMode.NEGATIVE:
                continue  # no parameters: nothing to violate (the malformed test sends them junk instead)
            strategy = op.as_strategy(generation_mode=mode)
            if mode is GenerationMode.POSITIVE:
                strategy = strategy.map(_servable(name))
            where = f"{method} {op.path} {mode.value}"

            def send(case, where=where):
                r = case.call(base_url=server, session=session, timeout=60)
                assert not getattr(r, "stream_cut_short", False), "the client stopped reading a stream early"
                ledger.check(where, r.status_code, r.headers, r.content, case.body)

            _run(strategy, SCHEMA_EXAMPLES[method, mode.value], send)
    assert not ledger.problems, "\n".join(ledger.problems[:10])
    assert sum(ledger.count.values()) >= 600, ledger.count
    test_schema_driven_fuzz.sent = sum(ledger.count.values())  # for the total checked by the next test


VALID = {"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
ROUTES = ["/v1/chat/completions", "/v1/completions"]


@st.composite
def malformed(draw):
    """(method, path, headers, body bytes)."""
    kind = draw(st.sampled_from(["bytes", "truncated", "mutated", "nested", "content_type", "method", "path",
                                 "wrong_types"]))
    path = draw(st.sampled_from(ROUTES))
    json_ct = {"content-type": "application/json"}
    text = json.dumps(VALID | {"prompt": "hi"}).encode()
    if kind == "bytes":
        return "POST", path, json_ct, draw(st.binary(max_size=300))
    if kind == "truncated":
        return "POST", path, json_ct, text[:draw(st.integers(0, len(text) - 1))]
    if kind == "mutated":
        i = draw(st.integers(0, len(text) - 1))
        return "POST", path, json_ct, text[:i] + draw(st.binary(min_size=1, max_size=4)) + text[i + 1:]
    if kind == "nested":
        depth = draw(st.integers(1, 200_000))
        inner = b"[" * depth + b"]" * depth
        return "POST", path, json_ct, b'{"model": "llama", "messages": ' + inner + b"}"
    if kind == "content_type":
        ct = draw(st.sampled_from(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                   "application/json; charset=latin-1", ""]))
        return "POST", path, {"content-type": ct}, text
    if kind == "method":
        method = draw(st.sampled_from(["GET", "PUT", "DELETE", "PATCH"]))
        return method, draw(st.sampled_from(ROUTES + ["/v1/models", "/health", "/metrics"])), json_ct, b""
    if kind == "path":
        suffix = draw(st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="?#%"),
                              max_size=30))
        return draw(st.sampled_from(["GET", "POST"])), "/v1/" + suffix, json_ct, b"{}"
    field = draw(st.sampled_from(["messages", "prompt", "max_tokens", "n", "stop", "temperature", "stream",
                                  "logprobs", "seed", "stop_token_ids", "timeout", "stream_options", "model"]))
    value = draw(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                           st.text(max_size=20), st.lists(st.integers(-5, 2**40), max_size=5),
                           st.dictionaries(st.text(max_size=5), st.integers(), max_size=3)))
    return "POST", path, json_ct, json.dumps(VALID | {"prompt": "hi", field: value}).encode()


def test_malformed_requests(server):
    ledger = Ledger()
    with httpx.Client(base_url=server, timeout=60) as client:
        def send(request):
            method, path, headers, body = request
            r = client.request(method, path, headers=headers, content=body)
            try:
                sent = json.loads(body)
            except (ValueError, RecursionError):
                sent = body
            ledger.check(f"malformed {method} {path.split('/')[-1]}", r.status_code, r.headers, r.content, sent)

        _run(malformed(), MALFORMED_EXAMPLES, send)
        assert client.get("/health").status_code == 200   # still serving after all of it
    assert not ledger.problems, "\n".join(ledger.problems[:10])
    total = sum(ledger.count.values()) + getattr(test_schema_driven_fuzz, "sent", 0)
    assert total >= MIN_REQUESTS or not hasattr(test_schema_driven_fuzz, "sent"), (total, ledger.count)
