"""One engine turn's outputs as they leave the engine core: the plain rows in columns, every other output whole.

Most rows of a decode step say only "request r has token t" (not finished, no logprobs, no text: the text is
made on the front side, engine/text_streams.py). Those are five list entries each, not a RequestOutput: an
engine process pickles a whole 128-row step as five lists of numbers and strings, where a tuple per row cost
~8 % of its time and building the dataclasses ~4 % more (bench/results/served_profile_neollm_c128_api2-h100.json).
Outputs that say more (finished, an error, logprobs, text already made) stay whole in `others`. With several API
processes in front of an engine process, each gets every plain row (the columns pickled once; a process skips the
rows of requests it does not hold) and only its own other outputs: routing 128 rows one by one cost the engine
process more than pickling them again.
"""
from __future__ import annotations

import pickle

from hybridserve.engine.request import FinishReason, RequestOutput


def plain_output(request_id: str, token: int, text: str, count: int, prompt: int, pages: int, state_bytes: int,
                 page_bytes: int, stop: str | None = None) -> RequestOutput:
    """A plain row as a RequestOutput, with its text; `stop`: the stop string it completed (found on the front
    side, engine/text_streams.py), which makes it the request's last."""
    return RequestOutput(request_id, [token], text, stop is not None, FinishReason.STOP if stop is not None else None,
                         stop, [], prompt, count, state_bytes, pages * page_bytes)


class StepRows:
    __slots__ = ("ids", "tokens", "counts", "prompts", "pages", "others")

    def __init__(self, ids: list[str] | None = None, tokens: list[int] | None = None,
                 counts: list[int] | None = None, prompts: list[int] | None = None, pages: list[int] | None = None,
                 others: list[RequestOutput] | None = None):
        self.ids: list[str] = ids if ids is not None else []          # request ids of the plain rows
        self.tokens: list[int] = tokens if tokens is not None else []  # the token each produced
        self.counts: list[int] = counts if counts is not None else []  # its output tokens so far
        self.prompts: list[int] = prompts if prompts is not None else []   # its prompt tokens
        self.pages: list[int] = pages if pages is not None else []     # KV pages it holds
        self.others: list[RequestOutput] = others if others is not None else []

    def add(self, request_id: str, token: int, count: int, prompt: int, pages: int) -> None:
        self.ids.append(request_id)
        self.tokens.append(token)
        self.counts.append(count)
        self.prompts.append(prompt)
        self.pages.append(pages)

    def __len__(self) -> int:
        return len(self.ids) + len(self.others)

    def plain(self):
        """(request id, token, output count, prompt tokens, pages) of each plain row."""
        return zip(self.ids, self.tokens, self.counts, self.prompts, self.pages)

    def outputs(self, state_bytes: int, page_bytes: int) -> list[RequestOutput]:
        """Every row as a RequestOutput (plain rows with empty text), the plain rows first."""
        return [plain_output(rid, t, "", n, p, k, state_bytes, page_bytes)
                for rid, t, n, p, k in self.plain()] + self.others

    def columns(self) -> tuple:
        return self.ids, self.tokens, self.counts, self.prompts, self.pages

    def to_wire(self, columns: tuple | bytes | None = None) -> tuple:
        """(the plain rows' columns, or `columns` given: for several API processes, the columns pickled once
        and sent to each; the other outputs as wire tuples)."""
        return self.columns() if columns is None else columns, [o.to_wire() for o in self.others]

    @classmethod
    def from_wire(cls, t: tuple) -> StepRows:
        columns, others = t
        if isinstance(columns, bytes):
            columns = pickle.loads(columns)
        return cls(*columns, [RequestOutput.from_wire(o) for o in others])

    def split_others(self, owner_of) -> dict:
        """The other outputs by `owner_of(request id, finished)` (None: nobody's, dropped): owner → list."""
        parts: dict = {}
        for o in self.others:
            i = owner_of(o.request_id, o.finished)
            if i is not None:
                parts.setdefault(i, []).append(o)
        return parts
