"""OpenAI wire format: request validation and response shapes.

Unions are normalised by before-validators into one concrete type, so a validation error names the field
(`stop.0`, `messages.1.content`) instead of pydantic's union branch tags.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, model_serializer, model_validator

from hybridserve.engine.request import SamplingParams

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_CHOICES = 16
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256  # characters; the detokenizer holds back this much text to match stops across tokens


class _Request(BaseModel):
    """Unknown fields are kept (and logged by the app) rather than rejected, as vLLM does: clients send many."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


def _text_to_parts(value: Any) -> Any:
    return [{"type": "text", "text": value}] if isinstance(value, str) else value


def _str_to_list(value: Any) -> Any:
    if isinstance(value, str):
        return [value]
    if value is not None and not isinstance(value, list):
        raise ValueError("must be a string or a list of strings")
    return value


class TextPart(_Request):
    type: Literal["text"]
    text: str


def _one_or_list(item: dict[str, Any]) -> dict[str, Any]:
    """What the wire accepts where a before-validator normalises to a list (the published schema would
    otherwise only show the normalised form)."""
    return {"anyOf": [item, {"type": "array", "items": item, "minItems": 1}]}


_TEXT_PART_SCHEMA = {"type": "object", "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                     "required": ["type", "text"]}
_TOKEN_IDS_SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "tool"]
    content: Annotated[list[TextPart] | None, BeforeValidator(_text_to_parts), WithJsonSchema(
        {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART_SCHEMA}, {"type": "null"}]})] = None
    name: str | None = None

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        # An assistant turn may be content-less (it carried tool calls); every other turn needs text.
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content is required for role '{self.role}'")
        return self

    @property
    def text(self) -> str:
        return "".join(part.text for part in self.content or [])


class StreamOptions(_Request):
    include_usage: bool = False


# The count bound sits on the list itself, not on the optional: on `... | None` it would be applied to null.
StopStrings = Annotated[
    Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]],
              Field(max_length=MAX_STOP_STRINGS)] | None,
    BeforeValidator(_str_to_list),
    WithJsonSchema({"anyOf": [{"type": "string", "minLength": 1, "maxLength": MAX_STOP_LENGTH},
                              {"type": "array", "maxItems": MAX_STOP_STRINGS,
                               "items": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_LENGTH}},
                              {"type": "null"}]}),
]


class SamplingRequest(_Request):
    """Fields shared by chat and legacy completions. Optional fields accept an explicit null (many clients
    send one for "unset"); `sampling_params` applies the defaults."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: StopStrings = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = None
    # vLLM extensions
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool | None = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    skip_special_tokens: bool | None = True
    include_stop_str_in_output: bool | None = False
    # hybridserve extension: seconds from arrival to the last token; capped by the server's --request-timeout
    timeout: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def num_choices(self) -> int:
        return self.n or 1

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def logprob_settings(self) -> tuple[bool, int]:
        """(return logprobs, number of alternatives); the two endpoints spell this differently."""
        raise NotImplementedError

    def sampling_params(self, max_tokens: int, defaults: dict | None = None) -> SamplingParams:
        """`defaults` are the model's own sampling defaults (its generation config), used for the fields
        the request leaves out, as vLLM does; the OpenAI defaults apply after them."""
        d = defaults or {}

        def pick(value, key, fallback):
            return value if value is not None else d.get(key, fallback)

        logprobs, top_logprobs = self.logprob_settings()
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=pick(self.temperature, "temperature", 1.0),
            top_p=pick(self.top_p, "top_p", 1.0),
            top_k=pick(self.top_k or None, "top_k", -1),
            min_p=pick(self.min_p, "min_p", 0.0),
            seed=self.seed,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=pick(self.repetition_penalty, "repetition_penalty", 1.0),
            stop=list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=bool(self.ignore_eos),
            min_tokens=self.min_tokens or 0,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            skip_special_tokens=self.skip_special_tokens is not False,
            include_stop_str_in_output=bool(self.include_stop_str_in_output),
        )


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        # OpenAI deprecated max_tokens for chat in favour of max_completion_tokens; the newer one wins.
        return self.max_completion_tokens or self.max_tokens

    def logprob_settings(self) -> tuple[bool, int]:
        return bool(self.logprobs), self.top_logprobs or 0


def _normalize_prompt(value: Any) -> Any:
    """Every accepted prompt shape becomes a list of prompts, each a string or a list of token ids."""
    shape_error = ValueError(
        "must be a string, a list of strings, a list of token ids, or a list of lists of token ids"
    )
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise shape_error
    if not value:
        raise ValueError("must not be empty")

    def is_ids(item: Any) -> bool:
        return isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item)

    if is_ids(value):
        return [value]
    if all(isinstance(item, str) for item in value):
        return value
    if all(is_ids(item) for item in value):
        if any(not item for item in value):
            raise ValueError("must not contain an empty list of token ids")
        return value
    raise shape_error


class CompletionRequest(SamplingRequest):
    prompt: Annotated[list[str | list[int]], BeforeValidator(_normalize_prompt), WithJsonSchema(
        {"anyOf": [*_one_or_list({"type": "string"})["anyOf"], *_one_or_list(_TOKEN_IDS_SCHEMA)["anyOf"]]})]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=5)

    @model_validator(mode="after")
    def _no_echo(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported")
        return self

    def logprob_settings(self) -> tuple[bool, int]:
        return self.logprobs is not None, self.logprobs or 0


# ---- responses -------------------------------------------------------------------------------------------


class UsageMemory(BaseModel):
    """hybridserve extension: the memory this request held (fixed state slots + KV pages), summed over choices."""

    state_bytes: int = 0
    kv_bytes: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    memory: UsageMemory = Field(default_factory=UsageMemory)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] = Field(default_factory=list)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        # A delta carries only what changed: {"role": ...} once, then {"content": ...}, and {} at the end.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "hybridserve"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
