"""Tool parsers for models that answer a call as bare JSON: ``llama3_json`` (Llama 3.1-3.3: an answer that is
``{"name": ..., "parameters": {...}}``, optionally after ``<|python_tag|>``, several joined by ``;``) and
``mistral`` (``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` after any content).

Once the answer is seen to be calls it is held to its end and parsed whole; if it does not parse, all of it is
content, markers included: text is never lost.
"""

from __future__ import annotations

import json
from typing import Any

from inhouse.engine.base import ToolCallDelta
from inhouse.server.parsers.calls import call_pieces, name_and_arguments
from inhouse.server.parsers.text import partial_tag

__all__ = ["Llama3JsonParser", "MistralParser"]

PYTHON_TAG, TOOL_CALLS = "<|python_tag|>", "[TOOL_CALLS]"


def _objects(text: str) -> list[Any] | None:
    """The JSON values in ``text``, separated by whitespace or ``;``, or None if anything else is there."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    at = 0
    while True:
        while at < len(text) and (text[at].isspace() or text[at] == ";"):
            at += 1
        if at == len(text):
            return values
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError:
            return None
        values.append(value)


def _pieces(values: list[Any] | None) -> list[ToolCallDelta] | None:
    calls = [name_and_arguments(v) for v in values or ()]
    if not calls or any(c is None for c in calls):
        return None
    return [piece for i, call in enumerate(calls) if call is not None for piece in call_pieces(i, *call)]


class _HeldCalls:
    """Content until the answer turns out to be calls, then everything held to the end."""

    def __init__(self) -> None:
        self._buf = ""
        self._held = False
        self.calls = 0

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self._buf += text
        if self._held:
            return "", []
        content, self._buf, self._held = self._split(self._buf)
        return content, []

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        rest, self._buf = self._buf, ""
        pieces = self._parse(rest) if self._held else None
        if pieces is None:
            return rest, []
        self.calls = pieces[-1].index + 1
        return "", pieces

    def _split(self, text: str) -> tuple[str, str, bool]:
        """(content to emit, text to keep, whether the kept text is calls)."""
        raise NotImplementedError

    def _parse(self, text: str) -> list[ToolCallDelta] | None:
        raise NotImplementedError


class Llama3JsonParser(_HeldCalls):
    def __init__(self) -> None:
        super().__init__()
        self._decided = False

    def _split(self, text: str) -> tuple[str, str, bool]:
        if self._decided:
            return text, "", False
        head = text.lstrip()
        if head.startswith((PYTHON_TAG, "{")):
            return "", text, True
        if not head or PYTHON_TAG.startswith(head):
            return "", text, False
        self._decided = True
        return text, "", False

    def _parse(self, text: str) -> list[ToolCallDelta] | None:
        return _pieces(_objects(text.lstrip().removeprefix(PYTHON_TAG)))


class MistralParser(_HeldCalls):
    def _split(self, text: str) -> tuple[str, str, bool]:
        start = text.find(TOOL_CALLS)
        if start != -1:
            return text[:start], text[start:], True
        cut = len(text) - partial_tag(text, TOOL_CALLS)
        return text[:cut], text[cut:], False

    def _parse(self, text: str) -> list[ToolCallDelta] | None:
        values = _objects(text.removeprefix(TOOL_CALLS))
        if not values or len(values) != 1 or not isinstance(values[0], list):
            return None
        return _pieces(values[0])
