"""A request's text, made on the front side of the engine core (the API process, or the event loop beside an
engine thread), as vLLM detokenizes in its API server rather than in its engine core.

The engine core then hands out tokens only (LLMEngine.detokenize = False): it finishes a request on a stop token
or by length, and never sees a stop string. On the front side each token goes through the request's
IncrementalDetokenizer (engine/detokenizer.py, one per request in AsyncEngine's entry); where a stop string
completes, the output is cut there and marked finished, and the caller aborts the request in the engine core.
With async scheduling the core has by then computed a token or two past the stop; they are dropped, as a token
sampled after a stop token is.

Why: past ~64 streams the engine process is the limit (one core; bench/NOTES.md, twenty-eighth session), and
detokenizing was ~6 % of it; the API processes, of which there can be several, take that share instead.
"""
from __future__ import annotations

from hybridserve.engine.detokenizer import IncrementalDetokenizer
from hybridserve.engine.request import FinishReason, RequestOutput


def whole_text(detok: IncrementalDetokenizer, out: RequestOutput) -> tuple[RequestOutput, bool]:
    """An output the engine core sent whole (finished, logprobs, an error) with its text filled in from the
    request's detokenizer: (the output, whether a stop string ended it here). A stop token's own text is never
    shown; a finished request's held-back text is released. A plain row's token goes through `detok.step_token`
    directly (AsyncEngine._on_engine_update)."""
    if out.error is not None or out.finish_reason is FinishReason.ABORT:
        return out, False
    parts, stopped = [], False
    if out.finish_reason is FinishReason.STOP:   # a stop token (the core knows no stop strings)
        parts.append(detok.flush())
    else:
        toks = out.new_token_ids
        for i, t in enumerate(toks):
            text, matched = detok.step_token(t)
            parts.append(text)
            if matched is not None:   # tokens after it are dropped
                out.num_output_tokens -= len(toks) - 1 - i
                out.new_token_ids, out.logprobs = toks[:i + 1], out.logprobs[:i + 1]
                out.finished, out.finish_reason, out.stop_reason = True, FinishReason.STOP, matched
                stopped = True
                break
        if out.finished and not stopped:
            parts.append(detok.flush())
    out.new_text = out.new_text + "".join(parts)
    return out, stopped
