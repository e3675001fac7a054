"""The plain dataclasses where the HTTP layer and the engine meet. No tensors, no HTTP objects."""
from __future__ import annotations

import operator
from dataclasses import dataclass, field, fields
from enum import Enum


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0        # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1                 # -1 = off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: bool = False          # return the sampled token's logprob
    top_logprobs: int = 0           # and this many alternatives (<= 20)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class FinishReason(str, Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (id, text, logprob)


@dataclass(frozen=True)
class RequestLimits:
    """What decides whether the engine can ever serve a request: plain numbers, so the check runs wherever the
    request arrives (the engine core, or an API process beside an engine process) with the same words."""

    vocab_size: int
    max_model_len: int
    kv_tokens: int | None = None    # tokens the KV page pool holds in all; None: no KV cache
    page_size: int = 16

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError for a request the engine cannot serve. Pure: safe from any thread."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        bad = next((t for t in prompt_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary (size {self.vocab_size})")
        if params.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {total} tokens ({len(prompt_ids)} in the prompt, {params.max_tokens} in the "
                f"completion).")
        if self.kv_tokens is not None and -(-total // self.page_size) * self.page_size > self.kv_tokens:
            raise ValueError(f"the request needs {total} tokens of KV cache; the pool holds {self.kv_tokens}")


@dataclass
class RequestOutput:
    """One update for one request: the tokens and text produced since the previous update."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None   # the stop token id or stop string that matched
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    state_bytes: int = 0                   # this request's fixed state memory (all groups)
    kv_bytes: int = 0                      # this request's KV pages at the last step
    error: str | None = None

    def to_wire(self) -> tuple:
        """The fields as a plain tuple, in declaration order: what crosses the engine process's pipe, one per row
        per step (64 rows on the CI box: 54 µs to convert and pickle, 76 to load and rebuild, against 148 and 186
        for the dataclasses themselves)."""
        return _WIRE_FIELDS(self)

    @classmethod
    def from_wire(cls, t: tuple) -> RequestOutput:
        return cls(*t)

    def then(self, later: RequestOutput) -> RequestOutput:
        """This update and the next one as one: both updates' tokens, text and logprobs in order, the later
        one's status and counts (memory: the larger)."""
        return RequestOutput(
            request_id=self.request_id, new_token_ids=self.new_token_ids + later.new_token_ids,
            new_text=self.new_text + later.new_text, finished=later.finished, finish_reason=later.finish_reason,
            stop_reason=later.stop_reason, logprobs=self.logprobs + later.logprobs,
            num_prompt_tokens=later.num_prompt_tokens, num_output_tokens=later.num_output_tokens,
            state_bytes=max(self.state_bytes, later.state_bytes), kv_bytes=max(self.kv_bytes, later.kv_bytes),
            error=later.error)


_WIRE_FIELDS = operator.attrgetter(*(f.name for f in fields(RequestOutput)))
