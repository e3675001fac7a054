"""A request's text, made on the front side of the engine core (the API process, or the event loop beside an
engine thread), as vLLM detokenizes in its API server rather than in its engine core.

The engine core then hands out tokens only (LLMEngine.detokenize = False): it finishes a request on a stop token
or by length, and never sees a stop string. Here each token goes through the request's IncrementalDetokenizer
(engine/detokenizer.py); where a stop string completes, the output is cut there and marked finished, and the
caller aborts the request in the engine core. With async scheduling the core has by then computed a token or two
past the stop; they are dropped, as a token sampled after a stop token is.

Why: past ~64 streams the engine process is the limit (one core; bench/NOTES.md, twenty-eighth session), and
detokenizing was ~6 % of it; the API processes, of which there can be several, take that share instead.
"""
from __future__ import annotations

from hybridserve.engine.detokenizer import IncrementalDetokenizer
from hybridserve.engine.request import FinishReason, RequestOutput, SamplingParams


class TextStream:
    """One request's detokenizer and stop strings."""

    __slots__ = ("_detok",)

    def __init__(self, tokenizer, prompt_ids: list[int], params: SamplingParams):
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids, params)

    def token(self, token: int) -> tuple[str, str | None]:
        """A plain row's token: (text to stream now, the stop string it completed or None)."""
        return self._detok.step_token(token)

    def whole(self, out: RequestOutput) -> tuple[RequestOutput, bool]:
        """An output the engine core sent whole (finished, logprobs, an error) with its text filled in:
        (the output, whether a stop string ended it here). A stop token's own text is never shown; a finished
        request's held-back text is released."""
        if out.error is not None or out.finish_reason is FinishReason.ABORT:
            return out, False
        parts, stopped = [], False
        if out.finish_reason is FinishReason.STOP:   # a stop token (the core knows no stop strings)
            parts.append(self._detok.flush())
        else:
            toks = out.new_token_ids
            for i, t in enumerate(toks):
                text, matched = self._detok.step_token(t)
                parts.append(text)
                if matched is not None:   # tokens after it are dropped
                    out.num_output_tokens -= len(toks) - 1 - i
                    out.new_token_ids, out.logprobs = toks[:i + 1], out.logprobs[:i + 1]
                    out.finished, out.finish_reason, out.stop_reason = True, FinishReason.STOP, matched
                    stopped = True
                    break
            if out.finished and not stopped:
                parts.append(self._detok.flush())
        out.new_text = out.new_text + "".join(parts)
        return out, stopped
