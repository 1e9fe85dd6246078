"""The ``hermes`` tool parser (Hermes, Qwen2.5/3, many others): ``<tool_call>{"name": ..., "arguments": {...}}
</tool_call>``, one or more.

Text before the first call is content; whitespace between and around calls is dropped.  A call is emitted when it
closes (or when the answer ends inside it), as one id+name piece and one arguments piece.  A call whose JSON does
not parse is passed through as content, tags and all: text is never lost.  Holds back only what could still be
the start of ``<tool_call>``, and a call until it closes.
"""

from __future__ import annotations

import json

from inhouse.engine.base import ToolCallDelta
from inhouse.server.parsers.calls import call_pieces, name_and_arguments
from inhouse.server.parsers.text import Trimmed, partial_tag

__all__ = ["HermesParser"]

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class HermesParser:
    """``feed`` and ``finish`` return (content, tool call pieces) for the text given so far."""

    def __init__(self) -> None:
        self._buf = ""
        self._in_call = False
        self._content = Trimmed(strip_leading=False)
        self._before = ""  # the whitespace before the open call: content again if the call is not one
        self.calls = 0

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self._buf += text
        content: list[str] = []
        pieces: list[ToolCallDelta] = []
        while True:
            if not self._in_call:
                start = self._buf.find(OPEN)
                if start == -1:
                    cut = len(self._buf) - partial_tag(self._buf, OPEN)
                    content.append(self._content.add(self._buf[:cut]))
                    self._buf = self._buf[cut:]
                    break
                content.append(self._content.add(self._buf[:start]))
                self._before = self._content.held()  # whitespace before a call is not content
                self._buf, self._in_call = self._buf[start + len(OPEN):], True
            else:
                end = self._buf.find(CLOSE)
                if end == -1:
                    break
                body, self._buf, self._in_call = self._buf[:end], self._buf[end + len(CLOSE):], False
                content.append(self._close(body, OPEN + body + CLOSE, pieces))
        return "".join(content), pieces

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        rest, self._buf = self._buf, ""
        pieces: list[ToolCallDelta] = []
        # the answer ended inside a call: a whole JSON object is still a call
        content = self._close(rest, OPEN + rest, pieces) if self._in_call else self._content.add(rest)
        held = self._content.held()
        return content + (held if not self.calls else ""), pieces

    def _close(self, body: str, raw: str, pieces: list[ToolCallDelta]) -> str:
        """A call's pieces, or its raw text as content when it is not a call."""
        try:
            call = name_and_arguments(json.loads(body))
        except ValueError:
            call = None
        if call is None:
            return self._content.add(self._before + raw)
        pieces.extend(call_pieces(self.calls, *call))
        self.calls += 1
        self._content.restart()
        return ""
