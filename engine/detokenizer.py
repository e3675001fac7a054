"""Streaming text for one request: incremental detokenization plus stop strings.

Decoding the whole output every step is O(length) per token; instead each step decodes a small window of
recent tokens (prefix_offset .. end) and emits only what is new past the part already emitted (the vLLM /
text-generation-inference algorithm). The window keeps a few tokens of left context because SentencePiece-style
decoders render a token differently at the start of a string. Text ending in U+FFFD may be an incomplete UTF-8
sequence whose remaining bytes are in the next token, so it is held back until it completes.

Where the tokenizer is a `tokenizers.Tokenizer` whose DecodeStream takes a prefix (tokenizers >= 0.21), the
same algorithm runs in its Rust implementation, one call per token (1.4 vs 5-9 µs a token on the CI box, a
fraction of a large batch's host time per step). It holds text back in the same way but has no bound for bytes
that never form valid UTF-8; after _MAX_PENDING tokens without text, the request continues on the window code
here, which cuts such a run short. `STREAM = False` uses the window code only.

Stop strings are matched on text, so the held-back tail of the text that could still grow into a stop string is
not streamed; what the client sees is always a prefix of the final text.
"""
from __future__ import annotations

from hybridserve.engine.request import SamplingParams

try:
    from tokenizers.decoders import DecodeStream
    DecodeStream(ids=[], skip_special_tokens=False)
except (ImportError, TypeError):   # older tokenizers: no DecodeStream, or none that takes a prefix
    DecodeStream = None

_CONTEXT_TOKENS = 5   # prompt tokens kept as left context for the first output token
_MAX_PENDING = 4      # an incomplete UTF-8 tail spans at most 3 byte-level tokens; more pending means invalid bytes
_REPLACEMENT = "\ufffd"
STREAM = True         # use tokenizers' DecodeStream where the tokenizer offers it


class IncrementalDetokenizer:
    """One per request. Feed every sampled id (EOS too: it is skipped or shown per skip_special_tokens) to
    `step`; call `flush` when the request ends without a stop string."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self._tokenizer = tokenizer
        self._skip = tokenizer.all_special_ids if params.skip_special_tokens else frozenset()
        self._stops = [s for s in params.stop if s]
        self._include_stop = params.include_stop_str_in_output
        # Chars of already-decoded text a stop string could still start in.
        self._tail_len = max(map(len, self._stops), default=1) - 1

        context: list[int] = []
        for token_id in reversed(prompt_token_ids):
            if len(context) == _CONTEXT_TOKENS:
                break
            if token_id not in self._skip:
                context.append(token_id)
        context.reverse()
        self._window(context, len(context))
        # A prompt cut inside a UTF-8 sequence would make the output's first bytes decode differently from
        # the output on its own; such a prompt gives no context.
        if context and self._convert(0, len(context)).endswith(_REPLACEMENT):
            context = []
            self._window(context, 0)

        # The DecodeStream path: the stream, and the ids fed to it (the context first) with how many of them
        # have turned into text; the last few of those are left context if the request moves to the window.
        hf = getattr(tokenizer, "hf_tokenizer", None)
        self._hf = hf if STREAM and DecodeStream is not None and hf is not None else None
        if self._hf is not None:
            self._stream = DecodeStream(ids=context, skip_special_tokens=False)
            self._vocab = tokenizer.vocab_size
            self._ids, self._final = context, len(context)

        self._tail = ""          # last `_tail_len` chars of decoded text, where a stop string may begin
        self._held = 0           # how many chars at the end of `_tail` were not emitted yet
        self._chunks: list[str] = []
        self._stopped = False

    @property
    def output_text(self) -> str:
        return "".join(self._chunks)

    def step(self, new_token_ids: list[int]) -> tuple[str, str | None]:
        """Returns (text safe to stream now, the stop string that matched or None). After a stop string matched
        the request is over: later tokens are ignored."""
        if self._stopped:
            return "", None
        return self._emit("".join(self._stream_token(t) if self._hf is not None else self._decode_token(t)
                                  for t in new_token_ids))

    def step_token(self, token_id: int) -> tuple[str, str | None]:
        """`step([token_id])`, as the engine calls it for every row of every step."""
        if self._stopped:
            return "", None
        return self._emit(self._stream_token(token_id) if self._hf is not None else self._decode_token(token_id))

    def _emit(self, delta: str) -> tuple[str, str | None]:
        """The step's new text through the stop strings: (text to stream, the stop string that matched)."""
        if not self._stops:
            self._chunks.append(delta)
            return delta, None

        text = self._tail + delta
        start_of_new = len(self._tail) - self._held
        match = self._first_stop(text)
        if match is not None:
            start, stop = match
            out = text[start_of_new:start + len(stop) if self._include_stop else start]
            self._stopped = True
            self._chunks.append(out)
            return out, stop
        # With the stop string included in the output a partial match may be streamed: it is output either way.
        self._held = 0 if self._include_stop else self._partial_stop_len(text)
        out = text[start_of_new:len(text) - self._held]
        self._tail = text[len(text) - min(len(text), self._tail_len):]
        self._chunks.append(out)
        return out, None

    def flush(self) -> str:
        """At finish by length or EOS: release text held back for a possible stop string, and a trailing
        incomplete UTF-8 sequence as decoded (U+FFFD), so the stream adds up to the full decode."""
        if self._stopped:
            return ""
        out = self._tail[len(self._tail) - self._held:] if self._held else ""
        if self._hf is not None and len(self._ids) > self._final:
            self._to_window()
        if len(self._tokens) > self._read_offset:
            out += self._convert(self._prefix_offset, len(self._tokens))[self._emitted:]
            self._prefix_offset = self._read_offset = len(self._tokens)
            self._emitted = 0
        self._tail, self._held = "", 0
        self._chunks.append(out)
        return out

    # ---- incremental detokenization ------------------------------------------------------------------------

    def _stream_token(self, token_id: int) -> str:
        if token_id in self._skip or not 0 <= token_id < self._vocab:   # out of the vocabulary: no text
            return ""
        text = self._stream.step(self._hf, token_id)
        self._ids.append(token_id)
        if text is not None:
            self._final = len(self._ids)
            return text
        if len(self._ids) - self._final < _MAX_PENDING:
            return ""
        # Bytes that may never decode: go on with the window code, which can cut such a run short.
        last = self._ids.pop()
        self._to_window()
        return self._decode_token(last)

    def _to_window(self) -> None:
        """Hand the stream's state to the window code: a few ids that turned into text, then the pending ones."""
        start = max(0, self._final - _CONTEXT_TOKENS)
        self._hf = None
        self._window(self._ids[start:], self._final - start)
        self._ids = []

    def _window(self, ids: list[int], final: int) -> None:
        """Start the window over `ids`, of which the first `final` are text already passed on."""
        self._tokens: list[str] = self._tokenizer.convert_ids_to_tokens(ids)
        self._prefix_offset = 0
        self._read_offset = final        # window text up to here is final and already emitted
        self._emitted = len(self._convert(0, final))   # chars of window text already passed on

    def _convert(self, start: int, end: int) -> str:
        return self._tokenizer.convert_tokens_to_string(self._tokens[start:end]) if end > start else ""

    def _advance(self, read_offset: int) -> None:
        """Everything up to `read_offset` is final: slide the window so it starts at the old read offset."""
        self._prefix_offset, self._read_offset = self._read_offset, read_offset
        self._emitted = len(self._convert(self._prefix_offset, self._read_offset))

    def _decode_token(self, token_id: int) -> str:
        if token_id in self._skip:
            return ""
        self._tokens += self._tokenizer.convert_ids_to_tokens([token_id])
        end = len(self._tokens)
        text = self._convert(self._prefix_offset, end)
        if not text.endswith(_REPLACEMENT):
            new = text[self._emitted:]
            self._advance(end)
            return new
        if end - self._read_offset < _MAX_PENDING:
            return ""
        # Too long to be an incomplete character, so some bytes are invalid and the text may never stop
        # ending in U+FFFD. Cut before the newest token if decoding the two sides apart changes nothing:
        # then the text before the cut is final and the window stays short.
        head = self._convert(self._prefix_offset, end - 1)
        if head + self._convert(end - 1, end) != text:
            return ""
        new = head[self._emitted:]
        self._advance(end - 1)
        return new

    # ---- stop strings ----------------------------------------------------------------------------------------

    def _first_stop(self, text: str) -> tuple[int, str] | None:
        """The stop string that completes first (as if text arrived one char at a time); on a tie the one that
        starts first. Returns (start index, stop string)."""
        best = None
        for stop in self._stops:
            start = text.find(stop)
            if start >= 0:
                key = (start + len(stop), start)
                if best is None or key < best[0]:
                    best = (key, start, stop)
        return None if best is None else (best[1], best[2])

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        for length in range(min(len(text), self._tail_len), 0, -1):
            suffix = text[len(text) - length:]
            if any(stop.startswith(suffix) for stop in self._stops):
                return length
        return 0
