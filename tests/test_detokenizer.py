"""Incremental detokenizer: the stream adds up to the full decode, stop strings are never partially streamed.

Runs on two real byte-level BPE tokenizers: one trained here in a fraction of a second (always available, small
vocabulary, so emoji and accented letters split across several byte tokens), and the embedded SmolLM2 tokenizer
when its GGUF is installed.
"""
from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from hybridserve.engine import detokenizer
from hybridserve.engine.detokenizer import IncrementalDetokenizer
from hybridserve.engine.request import SamplingParams

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog. Grüße aus Köln, naïve café — “quotes”.",
    "日本語のテキストです。中文也可以。한국어 텍스트. Привет, мир! 😀😃🎉 👩‍👩‍👧‍👦 family 🇯🇵 flag",
    "def f(x):\n    return x ** 2  # comment\n\tindent == 'done'",
]
SPECIALS = ["<|endoftext|>", "<|im_end|>"]


class TrainedTokenizer:
    """A `tokenizers` byte-level BPE trained on CORPUS, exposing the interface the detokenizer uses."""

    def __init__(self):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(
            vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False))
        self._tok = self.hf_tokenizer = tok
        self.vocab_size = tok.get_vocab_size()
        self.all_special_ids = {tok.token_to_id(s) for s in SPECIALS}

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self._tok.id_to_token(i) for i in ids]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._tok.decoder.decode(tokens)


@pytest.fixture(autouse=True, params=["stream", "window"])
def path(request, monkeypatch):
    """Every test on both paths: tokenizers' DecodeStream (where the tokenizer has one) and the window code."""
    if request.param == "stream" and detokenizer.DecodeStream is None:
        pytest.skip("this tokenizers has no DecodeStream with a prefix")
    monkeypatch.setattr(detokenizer, "STREAM", request.param == "stream")
    return request.param


@pytest.fixture(scope="module", params=["trained", "smollm2"])
def tok(request):
    if request.param == "trained":
        return TrainedTokenizer()
    gguf = pytest.importorskip("gguf")
    from hybridserve.weights.checkpoint import CheckpointError
    from hybridserve.weights.embedded import embedded_gguf_path
    from hybridserve.weights.tokenizer import Tokenizer as ServerTokenizer
    try:
        path = embedded_gguf_path()
    except CheckpointError as e:
        pytest.skip(str(e))
    return ServerTokenizer.from_gguf_metadata(gguf.GGUFReader(path))


def stream(tok, ids, params, prompt=(), rng=None):
    """Feed `ids` in chunks of 1 (or random 1..3). Returns (final text, stop, history) where history holds
    (text streamed so far, full decode so far) after each step."""
    det = IncrementalDetokenizer(tok, list(prompt), params)
    streamed, history, stop, i = "", [], None, 0
    while i < len(ids) and stop is None:
        n = rng.randint(1, 3) if rng else 1
        delta, stop = det.step(ids[i:i + n])
        i += n
        streamed += delta
        history.append((streamed, tok.decode(ids[:i], skip_special_tokens=params.skip_special_tokens)))
    if stop is None:
        streamed += det.flush()
    assert det.output_text == streamed
    return streamed, stop, history


def reference_stop(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Char-by-char semantics: the first stop string to complete wins (the longer one on a tie)."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text.endswith(s, 0, end)]
        if hits:
            stop = max(hits, key=len)
            return (text[:end] if include else text[:end - len(stop)]), stop
    return text, None


def random_ids(tok, rng: random.Random) -> list[int]:
    """Real text, random ids (invalid byte runs, split characters) or real text with special tokens mixed in."""
    kind = rng.randrange(3)
    if kind == 1:
        return [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 40))]
    text = rng.choice(CORPUS)
    start = rng.randrange(len(text))
    ids = tok.encode(text[start:start + rng.randint(1, 60)])
    if kind == 2:
        for _ in range(2):
            ids.insert(rng.randint(0, len(ids)), rng.choice(sorted(tok.all_special_ids)))
    return ids


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_stream_adds_up_to_full_decode(tok, skip_special_tokens):
    rng = random.Random(0)
    params = SamplingParams(skip_special_tokens=skip_special_tokens)
    for _ in range(300):
        ids = random_ids(tok, rng)
        prompt = random_ids(tok, rng) if rng.random() < 0.5 else []
        full = tok.decode(ids, skip_special_tokens=skip_special_tokens)
        text, stop, history = stream(tok, ids, params, prompt, rng if rng.random() < 0.5 else None)
        assert text == full and stop is None
        assert all(full.startswith(h) for h, _ in history)


def test_split_emoji_is_held_until_complete(tok):
    ids = tok.encode("ok 😀🎉 done")
    pieces = tok.convert_ids_to_tokens(ids)
    assert any(tok.convert_tokens_to_string([p]).endswith("\ufffd") for p in pieces)   # an emoji is split
    det = IncrementalDetokenizer(tok, [], SamplingParams())
    deltas = [det.step([i])[0] for i in ids]
    assert "".join(deltas) == "ok 😀🎉 done"
    assert not any("\ufffd" in d for d in deltas)


def test_window_stays_short_on_invalid_bytes(tok):
    """Per-step cost is bounded even when the model emits bytes that never form valid UTF-8."""
    longest = []
    convert = tok.convert_tokens_to_string

    class Counting:
        all_special_ids = tok.all_special_ids
        convert_ids_to_tokens = tok.convert_ids_to_tokens

        @staticmethod
        def convert_tokens_to_string(tokens):
            longest.append(len(tokens))
            return convert(tokens)

    copyright_byte = next(i for i in range(tok.vocab_size) if tok.convert_ids_to_tokens([i]) == ["©"])
    rng = random.Random(1)
    # Random ids, then a long run of a lone UTF-8 continuation byte (0xA9), which never decodes.
    ids = [rng.randrange(tok.vocab_size) for _ in range(1500)] + [copyright_byte] * 500
    det = IncrementalDetokenizer(Counting(), [], SamplingParams())
    text = "".join(det.step([i])[0] for i in ids) + det.flush()
    assert text == tok.decode(ids)
    assert max(longest) <= 12


def test_stream_path_moves_to_the_window_on_invalid_bytes(tok, path):
    """DecodeStream holds bytes that never decode without bound; after a few such tokens the request goes on
    with the window code, and the text still adds up to the full decode."""
    if path != "stream":
        pytest.skip("the DecodeStream path only")
    copyright_byte = next(i for i in range(tok.vocab_size) if tok.convert_ids_to_tokens([i]) == ["©"])
    good = tok.encode("Grüße, café 😀 done.")
    det = IncrementalDetokenizer(tok, tok.encode("User: hi"), SamplingParams())
    assert "".join(det.step([i])[0] for i in good) == tok.decode(good)
    assert det._hf is not None                                   # valid text stays on the stream
    ids = [copyright_byte] * 40 + good
    text = "".join(det.step([i])[0] for i in ids) + det.flush()
    assert det._hf is None and text == tok.decode(ids)


def test_stop_string_across_tokens_is_never_streamed(tok):
    text = "The quick brown fox jumps over the lazy dog. Then more text."
    ids = tok.encode(text)
    assert not any("lazy dog" in t for t in tok.convert_ids_to_tokens(ids))
    out, stop, history = stream(tok, ids, SamplingParams(stop=["lazy dog"]))
    assert stop == "lazy dog"
    assert out == "The quick brown fox jumps over the "
    assert all(out.startswith(h) for h, _ in history)

    out, stop, history = stream(tok, ids, SamplingParams(stop=["lazy dog"], include_stop_str_in_output=True))
    assert (out, stop) == ("The quick brown fox jumps over the lazy dog", "lazy dog")
    assert all(out.startswith(h) for h, _ in history)


def test_first_completed_stop_wins(tok):
    ids = tok.encode("alpha beta gamma delta")
    assert stream(tok, ids, SamplingParams(stop=["gamma", "beta"]))[:2] == ("alpha ", "beta")
    assert stream(tok, ids, SamplingParams(stop=["ta gam", "a b"]))[:2] == ("alph", "a b")
    # "beta gamma" starts first but "gam" completes first.
    assert stream(tok, ids, SamplingParams(stop=["beta gamma", "gam"]))[:2] == ("alpha beta ", "gam")


def test_random_stop_strings_match_reference(tok):
    rng = random.Random(2)
    for _ in range(200):
        source = rng.choice(CORPUS)
        start = rng.randrange(len(source) - 10)
        text = source[start:start + rng.randint(10, 80)]
        ids = tok.encode(text)
        full = tok.decode(ids)
        stops = []
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.8:
                a = rng.randrange(len(full))
                stops.append(full[a:a + rng.randint(1, 8)])
            else:
                stops.append("zq" + full[-rng.randint(1, 3):])   # never matches; tail may look like a prefix
        include = rng.random() < 0.5
        expected, expected_stop = reference_stop(full, stops, include)
        params = SamplingParams(stop=stops, include_stop_str_in_output=include)
        out, stop, history = stream(tok, ids, params, rng=rng if rng.random() < 0.5 else None)
        assert (out, stop) == (expected, expected_stop), (full, stops, include)
        assert all(expected.startswith(h) for h, _ in history)
        if not include:   # after a step without a match, no streamed text starts a suffix that may become a stop
            for h, decoded in history[:-1] if stop else history:
                assert not any(s.startswith(decoded[j:]) for s in stops for j in range(len(h))), (h, decoded, stops)


def test_flush_releases_text_held_for_a_stop_that_never_came(tok):
    ids = tok.encode("Hello wor")
    det = IncrementalDetokenizer(tok, [], SamplingParams(stop=["world"]))
    streamed = "".join(det.step([i])[0] for i in ids)
    assert streamed == "Hello "
    assert det.output_text == "Hello "
    assert det.flush() == "wor"
    assert det.output_text == "Hello wor"


def test_nothing_after_a_stop(tok):
    det = IncrementalDetokenizer(tok, [], SamplingParams(stop=["fox"]))
    ids = tok.encode("The quick brown fox jumps")
    results = [det.step([i]) for i in ids]
    stops = [s for _, s in results if s is not None]
    assert stops == ["fox"]
    assert det.output_text == "The quick brown "
    assert det.flush() == ""


def test_special_tokens_and_prompt_context(tok):
    end = sorted(tok.all_special_ids)[0]
    prompt = tok.encode("User: hi") + [end]
    ids = tok.encode(" Sure, café") + [end]
    assert stream(tok, ids, SamplingParams(), prompt)[0] == tok.decode(ids)
    shown = stream(tok, ids, SamplingParams(skip_special_tokens=False), prompt)[0]
    assert shown == tok.decode(ids, skip_special_tokens=False) and shown != tok.decode(ids)
