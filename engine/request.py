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

    @classmethod
    def merged(cls, outs: list[RequestOutput]) -> RequestOutput:
        """Consecutive updates of one request as one: their tokens, text and logprobs in order, the last one's
        status and counts (memory: the largest). Built once for the run, not pairwise."""
        last = outs[-1]
        return cls(request_id=last.request_id, new_token_ids=[t for o in outs for t in o.new_token_ids],
                   new_text="".join(o.new_text for o in outs), finished=last.finished,
                   finish_reason=last.finish_reason, stop_reason=last.stop_reason,
                   logprobs=[lp for o in outs for lp in o.logprobs], num_prompt_tokens=last.num_prompt_tokens,
                   num_output_tokens=last.num_output_tokens, state_bytes=max(o.state_bytes for o in outs),
                   kv_bytes=max(o.kv_bytes for o in outs), error=last.error)


_WIRE_FIELDS = operator.attrgetter(*(f.name for f in fields(RequestOutput)))
