"""The text events of a stream, rendered without building a pydantic model per token.

Nearly every event of a streamed response carries only new text: the same id, model, choice index and nulls
each time. `TextEvents` renders that event once per choice index through the response models with a probe
text, splits it at the probe's JSON, and afterwards joins the two halves around each text's JSON, encoded by
the same serializer (pydantic-core), so the bytes are those the models would give. Events with anything else
(logprobs, a finish reason, the role) still go through the models.
"""
from __future__ import annotations

import uuid
from collections.abc import Callable

from pydantic_core import to_json


class TextEvents:
    """`render(index, text)` → the SSE event of choice `index` whose only varying field is `text`; calling this
    object with (index, text) returns the same string, from a template made for each index on first use."""

    def __init__(self, render: Callable[[int, str], str]):
        self._render = render
        self._halves: dict[int, tuple[str, str]] = {}

    def __call__(self, index: int, text: str) -> str:
        halves = self._halves.get(index)
        if halves is None:
            halves = self._halves[index] = self._template(index)
        return halves[0] + to_json(text).decode() + halves[1]

    def _template(self, index: int) -> tuple[str, str]:
        probe = f"hybridserve-{uuid.uuid4().hex}"
        event = self._render(index, probe)
        encoded = to_json(probe).decode()
        if event.count(encoded) != 1:
            raise ValueError("the probe text must appear exactly once in the rendered event")
        head, tail = event.split(encoded)
        return head, tail
