"""The start-up warm-up's requests: before /health turns ready, the engine serves a few requests built to meet
the step shapes that serving meets, so that the Triton kernel variants they need compile now, not inside a
user's request (on a machine with an empty Triton cache each new variant costs 0.1-1 s of compile time, and a
burst of them stalls every stream for seconds).

Graph-captured steps compiled their kernels while being captured; what is left is what runs eagerly, and the
first replays of each graph kind:
  - several prompts prefilled in one step (prompts arriving together; eager past 64 sequences or the largest
    token bucket), and each prompt's last-chunk logits;
  - a decode step beside more than one prompt chunk, and a prompt arriving while others decode;
  - a prompt longer than the step's token budget (chunked prefill, a chunk above the prefill graphs);
  - the eager sampler: seeded rows, penalties, logprobs with alternatives, min_tokens, top_k / min_p;
  - the sampler graphs' temperature / top_p rows beside greedy ones.

`basic` is one 1-token prompt generating one token (what an engine that cannot generate must fail on);
`shapes` adds the waves below. Each wave is submitted once every request of the wave before it has its first
token, so later prompts arrive while earlier ones decode. Prompt ids are real text through the tokenizer."""
from __future__ import annotations

from dataclasses import dataclass

from hybridserve.engine.request import SamplingParams

MODES = ("basic", "shapes")

_TEXT = ("The quick brown fox jumps over the lazy dog while the river keeps running past the old mill. "
         "Numbers like 3.14159, 2718 and 1e-9 sit beside words in other scripts: café, straße, 東京, данные. ")


@dataclass
class WarmupRequest:
    prompt_ids: list[int]
    params: SamplingParams


def _ids(tokenizer, n: int) -> list[int]:
    base = tokenizer.encode(_TEXT, add_special_tokens=False) or [0]
    out = base * (n // len(base) + 1)
    return out[:n]


def resolve(mode: str, device_type: str) -> str:
    """EngineConfig.warmup → a plan mode: `auto` meets the step shapes where kernels JIT-compile (CUDA)."""
    if mode == "auto":
        return "shapes" if device_type == "cuda" else "basic"
    if mode not in MODES:
        raise ValueError(f"unknown warm-up {mode!r}; choose from auto, {', '.join(MODES)}")
    return mode


def plan(mode: str, tokenizer, max_model_len: int, max_num_batched_tokens: int, max_concurrency: int,
         kv_token_capacity: int | None) -> list[list[WarmupRequest]]:
    """The warm-up as waves of requests. `kv_token_capacity`: tokens the KV pool holds in all (None: no KV
    cache); a wave never asks for more than half of it, nor for more rows than the engine runs at once."""
    if mode not in MODES:
        raise ValueError(f"unknown warm-up mode {mode!r}; choose from {', '.join(MODES)}")
    basic = [[WarmupRequest(_ids(tokenizer, 1), SamplingParams(max_tokens=1, temperature=0))]]
    if mode == "basic":
        return basic
    budget = (kv_token_capacity // 2) if kv_token_capacity is not None else None
    rows = max(1, max_concurrency)

    def fits(reqs: list[WarmupRequest], free_rows: int) -> list[WarmupRequest]:
        kept, used = [], 0
        for r in reqs:
            total = len(r.prompt_ids) + r.params.max_tokens
            if total > max_model_len or len(kept) >= free_rows:
                continue
            if budget is not None and used + total > budget:
                continue
            kept.append(r)
            used += total
        return kept

    greedy = dict(temperature=0.0, ignore_eos=True)
    # The first wave leaves a row free, so that a prompt of the second arrives while the first decode.
    first = fits([  # prompts arriving together: one eager prefill of several sequences, then a decode batch
        WarmupRequest(_ids(tokenizer, 3), SamplingParams(max_tokens=12, **greedy)),
        WarmupRequest(_ids(tokenizer, 21), SamplingParams(max_tokens=12, **greedy)),
        WarmupRequest(_ids(tokenizer, 77), SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9,
                                                          ignore_eos=True)),
        WarmupRequest(_ids(tokenizer, 150), SamplingParams(max_tokens=12, **greedy)),
    ], max(1, rows - 1))
    second = fits([  # arriving while the first decode: mixed steps, the eager sampler's paths
        WarmupRequest(_ids(tokenizer, 40), SamplingParams(max_tokens=6, temperature=0.7, top_k=20, min_p=0.05,
                                                          seed=1, ignore_eos=True)),
        WarmupRequest(_ids(tokenizer, 9), SamplingParams(max_tokens=6, temperature=1.0, presence_penalty=0.5,
                                                         frequency_penalty=0.3, repetition_penalty=1.1,
                                                         logprobs=True, top_logprobs=5, min_tokens=3)),
        WarmupRequest(_ids(tokenizer, 300), SamplingParams(max_tokens=4, **greedy)),
    ], max(1, rows - len(first)))
    # A prompt over the step's token budget: a full-budget chunk and a remainder, next to decoding rows.
    long_len = max_num_batched_tokens + max_num_batched_tokens // 3 + 5
    third = fits([WarmupRequest(_ids(tokenizer, min(long_len, max_model_len - 4)),
                                SamplingParams(max_tokens=4, **greedy))], rows)
    return basic + [w for w in (first, second, third) if w]
