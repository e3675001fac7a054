"""The text events of a stream, rendered without building a pydantic model per token.

Nearly every event of a streamed response carries only new text: the same id, model, choice index and nulls
each time. `TextEvents` renders that event once through the response models with a probe text, splits it at
the probe's JSON, and afterwards joins the two halves around each text's JSON, encoded by the same serializer
(pydantic-core), so the bytes are those the models would give. Events with anything else (logprobs, a finish
reason, the role) still go through the models.
"""
from __future__ import annotations

import uuid
from collections.abc import Callable

from pydantic_core import to_json


class TextEvents:
    """`render(text)` → the SSE event of a chunk whose only varying field is `text`; calling this object with
    a text returns the same string as `render(text)`."""

    def __init__(self, render: Callable[[str], str]):
        probe = f"hybridserve-{uuid.uuid4().hex}"
        event = render(probe)
        encoded = to_json(probe).decode()
        if event.count(encoded) != 1:
            raise ValueError("the probe text must appear exactly once in the rendered event")
        self._head, self._tail = event.split(encoded)

    def __call__(self, text: str) -> str:
        return self._head + to_json(text).decode() + self._tail
