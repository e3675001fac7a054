"""Tokenizer and chat template: one object the server uses to turn chats into ids and ids into text.

Built either from GGUF metadata (the embedded SmolLM2 model) or from an HF-style directory. The chat template is
rendered so that special-token strings typed *inside* messages never become control ids: a user cannot forge a
turn boundary by writing "<|im_end|>".
"""
from __future__ import annotations

import json
import re
import secrets
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import tokenizers
from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers

# GGUF token types (llama.cpp's llama_token_type): CONTROL tokens are the special tokens.
_GGUF_TOKEN_CONTROL = 3
_GGUF_TOKEN_USER_DEFINED = 4

# Pre-tokenizers we can reproduce exactly, by the name llama.cpp writes to `tokenizer.ggml.pre`.
_GGUF_PRE_TOKENIZERS = {
    "smollm": lambda: [pre_tokenizers.Digits(individual_digits=True),
                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)],
    "gpt-2": lambda: [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)],
}

# Private-use code points bracket the placeholders that stand in for special-token strings found in messages;
# templates' string filters (trim, upper, tojson without ASCII escaping) leave them intact.
_PH_OPEN, _PH_CLOSE = "\ue000", "\ue001"


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the facts generation needs: EOS ids, BOS handling, chat template."""

    def __init__(self, hf_tokenizer: tokenizers.Tokenizer, *, chat_template: str | None, eos_token_ids: list[int],
                 bos_token_id: int | None, add_bos: bool, special_tokens: dict[str, int] | None = None):
        self._tok = hf_tokenizer
        # A second instance with special-token matching off: toggling `encode_special_tokens` on a shared
        # instance would race between threads.
        self._plain = tokenizers.Tokenizer.from_str(hf_tokenizer.to_str())
        self._plain.encode_special_tokens = True
        self.chat_template = chat_template
        self.eos_token_ids = list(eos_token_ids)
        self.bos_token_id = bos_token_id
        self.add_bos = add_bos
        if special_tokens is None:
            special_tokens = {t.content: i for i, t in hf_tokenizer.get_added_tokens_decoder().items() if t.special}
        self.special_tokens = dict(special_tokens)
        self.all_special_ids: set[int] = set(self.special_tokens.values()) | set(self.eos_token_ids)
        if bos_token_id is not None:
            self.all_special_ids.add(bos_token_id)
        # Placeholder numbers ↔ special-token strings; the regex tries longest first so a prefix never wins.
        self._special_names = sorted(self.special_tokens)
        self._special_index = {name: i for i, name in enumerate(self._special_names)}
        by_length = sorted(self._special_names, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, by_length))) if by_length else None

    # ---- construction ---------------------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, fields: Mapping[str, Any] | Any) -> "Tokenizer":
        """Build from GGUF `tokenizer.*` metadata: a `gguf.GGUFReader` or its `.fields` mapping.

        Only byte-level BPE (`tokenizer.ggml.model == "gpt2"`) with a pre-tokenizer listed in
        `_GGUF_PRE_TOKENIZERS` is accepted; anything else raises ValueError rather than tokenizing wrongly.
        """
        fields = getattr(fields, "fields", fields)

        def value(key: str, default: Any = None) -> Any:
            field = fields.get(key)
            return default if field is None else field.contents()

        kind = value("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"unsupported GGUF tokenizer model {kind!r} (only byte-level BPE 'gpt2' is supported)")
        pre = value("tokenizer.ggml.pre", "gpt-2")
        if pre not in _GGUF_PRE_TOKENIZERS:
            raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r} (supported: {sorted(_GGUF_PRE_TOKENIZERS)})")
        tokens: list[str] = value("tokenizer.ggml.tokens")
        merges: list[str] = value("tokenizer.ggml.merges", [])
        types: list[int] = value("tokenizer.ggml.token_type", [])
        if not tokens:
            raise ValueError("GGUF metadata has no tokenizer.ggml.tokens")

        vocab = {t: i for i, t in enumerate(tokens)}
        tok = tokenizers.Tokenizer(models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges], fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.Sequence(_GGUF_PRE_TOKENIZERS[pre]())
        tok.decoder = decoders.ByteLevel()
        special = {tokens[i]: i for i, t in enumerate(types) if t == _GGUF_TOKEN_CONTROL}
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        user = [tokens[i] for i, t in enumerate(types) if t == _GGUF_TOKEN_USER_DEFINED]
        if user:
            tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

        # Stop on EOS (SmolLM2: <|im_end|>), on EOT if declared, and on <|endoftext|> (base-model habit).
        eos = [value(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
        eos.append(vocab.get("<|endoftext|>"))
        eos_ids = list(dict.fromkeys(int(i) for i in eos if i is not None))
        bos = value("tokenizer.ggml.bos_token_id")
        return cls(tok, chat_template=value("tokenizer.chat_template"), eos_token_ids=eos_ids,
                   bos_token_id=None if bos is None else int(bos),
                   add_bos=bool(value("tokenizer.ggml.add_bos_token", False)), special_tokens=special)

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "Tokenizer":
        """Build from an HF model directory: tokenizer.json, tokenizer_config.json, special_tokens_map.json,
        generation_config.json (the last three optional)."""
        path = Path(path)
        tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))

        def load(name: str) -> dict[str, Any]:
            file = path / name
            return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}

        config, special_map, generation = load("tokenizer_config.json"), load("special_tokens_map.json"), \
            load("generation_config.json")

        def token_id(key: str) -> int | None:
            name = config.get(key) or special_map.get(key)
            if isinstance(name, dict):       # serialized AddedToken
                name = name.get("content")
            return tok.token_to_id(name) if isinstance(name, str) else None

        bos_id = token_id("bos_token")
        eos = [token_id("eos_token")]
        gen_eos = generation.get("eos_token_id")
        eos += gen_eos if isinstance(gen_eos, list) else [gen_eos]
        eos_ids = list(dict.fromkeys(int(i) for i in eos if i is not None))

        add_bos = config.get("add_bos_token")
        if add_bos is None:
            # No explicit flag: the tokenizer.json post-processor decides (Llama-3 adds BOS this way).
            add_bos = bos_id is not None and tok.encode("", add_special_tokens=True).ids[:1] == [bos_id]

        template = config.get("chat_template")
        if isinstance(template, list):
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(tok, chat_template=template, eos_token_ids=eos_ids, bos_token_id=bos_id, add_bos=bool(add_bos))

    # ---- encode / decode ------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def hf_tokenizer(self) -> tokenizers.Tokenizer:
        return self._tok

    def encode(self, text: str, *, add_special_tokens: bool = False, allow_special: bool = True) -> list[int]:
        """Token ids of `text`. `add_special_tokens` prepends BOS when the model wants one. With
        `allow_special=False`, special-token strings in `text` are tokenized as ordinary text."""
        tok = self._tok if allow_special else self._plain
        ids = tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, id: int) -> str | None:
        return self._tok.id_to_token(id)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        """Raw (byte-level) token strings; ids outside the vocabulary (padded embedding rows) map to ""."""
        return [self._tok.id_to_token(i) or "" for i in ids]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Decode raw token strings; an incomplete UTF-8 sequence at the end comes back as U+FFFD."""
        decoder = self._tok.decoder
        return decoder.decode(list(tokens)) if decoder is not None else "".join(tokens)

    # ---- chat -----------------------------------------------------------------------------------------------

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, *, tools: list[dict] | None = None,
                    **kwargs: Any) -> str:
        """The prompt text the template produces, as is (for debugging and logging)."""
        return self._render(_normalize_messages(messages), add_generation_prompt, tools, kwargs)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **kwargs: Any) -> list[int]:
        """Prompt ids for a chat. The template's own special tokens become control ids; special-token strings
        inside messages, tools or extra template variables stay plain text.

        Every special-token string inside the inputs is swapped for a placeholder carrying a per-call random
        nonce before rendering; after rendering, the text between placeholders is encoded with specials on and
        each placeholder is encoded as plain text. Inputs without special-token strings therefore give exactly
        the ids of encoding the rendered string, whatever the template does with the content (trim, prefix, ...).
        """
        messages = _normalize_messages(messages)
        if self._special_re is None:
            return self.encode(self._render(messages, add_generation_prompt, tools, kwargs))
        nonce = secrets.token_hex(8)

        def escape(s: str) -> str:
            return self._special_re.sub(
                lambda m: f"{_PH_OPEN}{nonce}:{self._special_index[m.group(0)]}{_PH_CLOSE}", s)

        text = self._render(_map_strings(messages, escape), add_generation_prompt, _map_strings(tools, escape),
                            _map_strings(kwargs, escape))
        pieces = re.split(f"{_PH_OPEN}{nonce}:(\\d+){_PH_CLOSE}", text)
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i % 2:                                    # a captured placeholder index
                ids += self.encode(self._special_names[int(piece)], allow_special=False)
            elif piece:
                ids += self.encode(piece)
        return ids

    def _render(self, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None,
                kwargs: dict[str, Any]) -> str:
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template; send a plain completion prompt instead, "
                             "or use a model whose tokenizer_config.json / GGUF metadata defines chat_template")
        bos = self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else None
        eos = self.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else None
        variables = {"bos_token": bos or "", "eos_token": eos or "", **kwargs}
        try:
            return _compile(self.chat_template).render(messages=messages, tools=tools,
                                                        add_generation_prompt=add_generation_prompt, **variables)
        except TemplateError as e:
            raise ValueError(f"chat template failed: {e}") from e


def _normalize_messages(messages: list[dict]) -> list[dict]:
    """OpenAI-style content parts → one string (text parts joined by newlines, as vLLM does)."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ValueError(f"unsupported message content part {kind!r}: only text parts are supported")
                texts.append(part.get("text", ""))
            message = {**message, "content": "\n".join(texts)}
        out.append(message)
    return out


def _map_strings(value: Any, fn) -> Any:
    """Apply `fn` to every string inside nested dicts/lists (keys left alone)."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_strings(v, fn) for v in value]
    return value


def _raise_exception(message: str):
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    """HF's tojson: no HTML escaping and no ASCII escaping (jinja's own would mangle non-ASCII text)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(template: str):
    """Compile a template the way transformers does (sandboxed, trim/lstrip blocks, loop controls)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)
