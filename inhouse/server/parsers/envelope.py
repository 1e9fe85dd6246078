"""The ``constrained_json`` tool parser: reads the tools envelope a model without tool markup answered in.

The answer (``inhouse.engine.answer_schema``) is one JSON value: ``{"content": "..."}``, whose string is streamed
as content as it is decoded (escapes resolved, a ``\\u`` pair held until whole), or whose other JSON value (a
``response_format`` answer) is streamed as its JSON text; or a call ``{"<tool name>": {<arguments>}}``, or a list
of calls.  A call's id and name are sent as soon as its name is read and its arguments text is streamed as it comes,
so a client sees the call grow the way OpenAI streams it; a call counts (and the choice finishes with
``tool_calls``) once it closes.  Text that is not an envelope at all is passed through as content: text is never
lost.  Whitespace between JSON tokens is allowed (an upstream grammar may permit it).
"""

from __future__ import annotations

import json
import re

from inhouse.engine.base import ToolCallDelta
from inhouse.server.parsers.calls import call_id

__all__ = ["EnvelopeParser"]

_KEY = re.compile(r'\s*\{\s*("(?:[^"\\]|\\.)*")\s*:')
_KEY_PREFIX = re.compile(r'\s*(?:\{\s*(?:"(?:[^"\\]|\\.)*\\?(?:"\s*)?)?)?\Z')  # could still become _KEY
_STRING_STOP = re.compile(r'["\\]')
_SPACE = re.compile(r"\s*")
_CLOSING = re.compile(r"(?:\s*[}\]])*")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class EnvelopeParser:
    """``feed`` and ``finish`` return (content, tool call pieces) for the text given so far."""

    def __init__(self) -> None:
        self._buf = ""
        # head → content → string | value → done;  head → arguments → call_end → done;
        # head → items ⇄ arguments → call_end;  or pass (not an envelope: everything is content)
        self._state = "head"
        self._in_list = False
        self._depth = 0  # nesting inside the JSON value being streamed
        self._in_string = self._escaped = False
        self.calls = 0

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self._buf += text
        content: list[str] = []
        pieces: list[ToolCallDelta] = []
        while self._buf and self._step(content, pieces):
            pass
        return "".join(content), pieces

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        content, pieces = self.feed("")
        rest, self._buf = self._buf, ""
        if self._state in ("head", "items", "pass", "string"):  # never an envelope, or cut inside a key or escape
            content += rest
        return content, pieces

    # ---- one step: True while there is more to do with the buffer --------------------------------------------

    def _step(self, content: list[str], pieces: list[ToolCallDelta]) -> bool:
        state = self._state
        if state == "pass":
            content.append(self._buf)
            self._buf = ""
            return False
        if state in ("head", "items"):
            return self._opening(pieces)
        if state == "content":
            return self._content_start()
        if state == "string":
            return self._string(content)
        if state == "value":
            return self._value(content)
        if state == "arguments":
            return self._arguments(pieces)
        if state == "call_end":
            return self._call_end()
        rest = self._buf[_CLOSING.match(self._buf).end():]  # type: ignore[union-attr]  # done: closing brackets
        self._buf = rest
        if rest.strip():  # anything else after the envelope (no grammar allows it): content, never dropped
            self._state = "pass"
            return True
        self._buf = ""
        return False

    def _opening(self, pieces: list[ToolCallDelta]) -> bool:
        """At the start of the answer or of a list item: a list, ``{"content":``, or ``{"<tool name>":``.

        Nothing is consumed until the key is read, so text that turns out not to be an envelope passes whole."""
        at = 0
        if self._state == "items":
            self._buf = self._buf[_SPACE.match(self._buf).end():]  # type: ignore[union-attr]  # always matches
            if self._buf[:1] in (",", "]"):
                self._state = "done" if self._buf[0] == "]" else "items"
                self._buf = self._buf[1:]
                return bool(self._buf)
        elif self._buf.lstrip()[:1] == "[":  # a list of calls: the bracket is taken with the first call's name
            at = len(self._buf) - len(self._buf.lstrip()) + 1
        key = _KEY.match(self._buf, at)
        if key is None:
            if _KEY_PREFIX.match(self._buf, at) is None:
                self._state = "pass"
                return True
            return False
        if at:
            self._in_list = True
        try:
            name = json.loads(key.group(1))
        except ValueError:
            name = ""
        self._buf = self._buf[key.end():]
        if name == "content" and not self._in_list:
            self._state = "content"
        else:
            pieces.append(ToolCallDelta(self.calls, id=call_id(), name=name))
            self._state, self._depth = "arguments", 0
        return True

    def _content_start(self) -> bool:
        self._buf = self._buf[_SPACE.match(self._buf).end():]  # type: ignore[union-attr]  # always matches
        if not self._buf:
            return False
        self._state = "string" if self._buf[0] == '"' else "value"
        if self._state == "string":
            self._buf = self._buf[1:]
        return True

    def _string(self, content: list[str]) -> bool:
        """Decode the content string as far as it is whole."""
        stop = _STRING_STOP.search(self._buf)
        if stop is None:
            content.append(self._buf)
            self._buf = ""
            return False
        content.append(self._buf[:stop.start()])
        self._buf = self._buf[stop.start():]
        if self._buf[0] == '"':
            self._state, self._buf = "done", self._buf[1:]
            return True
        size = 6 if self._buf[1:2] == "u" else 2
        if size == 6 and len(self._buf) >= 6 and 0xD800 <= _hex(self._buf[2:6]) < 0xDC00:
            if len(self._buf) < 8 and "\\u".startswith(self._buf[6:]):
                return False  # its low half may follow
            if self._buf[6:8] == "\\u":
                size = 12  # a high surrogate: decoded with its low half
        if len(self._buf) < size:
            return False
        try:
            decoded = json.loads('"' + self._buf[:size] + '"')
        except ValueError:
            decoded = self._buf[:size]  # not a JSON escape: the text as written
        # a lone surrogate cannot be sent as UTF-8: the replacement character stands for it
        content.append(_LONE_SURROGATE.sub("\ufffd", decoded))
        self._buf = self._buf[size:]
        return True

    def _value(self, content: list[str]) -> bool:
        """Stream a non-string content value as its JSON text: an object or list to where it closes, a number or
        literal to the envelope's closing brace (without the whitespace before it)."""
        for i, char in enumerate(self._buf):
            depth = self._scan(char)
            if depth < 0 or (depth == 0 and char in "}]" and not self._in_string):
                end = i + 1 if depth == 0 else i
                content.append(self._buf[:end].rstrip() if depth < 0 else self._buf[:end])
                self._state, self._buf = "done", self._buf[end:]
                return True
        # whitespace after a number may be the envelope's, before its closing brace: held until that is known
        keep = 0 if self._in_string else len(self._buf) - len(self._buf.rstrip())
        content.append(self._buf[:len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep:]
        return False

    def _arguments(self, pieces: list[ToolCallDelta]) -> bool:
        """Stream a call's arguments: the JSON value after its name, to where that value closes."""
        if self._depth == 0 and not self._in_string:  # not started: skip the whitespace before it
            self._buf = self._buf[_SPACE.match(self._buf).end():]  # type: ignore[union-attr]  # always matches
            if not self._buf:
                return False
        end = None
        for i, char in enumerate(self._buf):
            if self._scan(char) == 0 and not self._in_string:
                end = i + 1
                break
        text = self._buf if end is None else self._buf[:end]
        self._buf = "" if end is None else self._buf[end:]
        if text:
            pieces.append(ToolCallDelta(self.calls, arguments=text))
        if end is None:
            return False
        self._state = "call_end"
        return True

    def _call_end(self) -> bool:
        self._buf = self._buf[_SPACE.match(self._buf).end():]  # type: ignore[union-attr]  # always matches
        if not self._buf:
            return False
        if self._buf[0] == "}":
            self._buf = self._buf[1:]
            self.calls += 1
        self._state = "items" if self._in_list else "done"
        return True

    def _scan(self, char: str) -> int:
        """Track JSON nesting through one character; returns the depth after it."""
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif char == "\\":
                self._escaped = True
            elif char == '"':
                self._in_string = False
        elif char == '"':
            self._in_string = True
        elif char in "{[":
            self._depth += 1
        elif char in "}]":
            self._depth -= 1
        return self._depth


def _hex(text: str) -> int:
    try:
        return int(text, 16)
    except ValueError:
        return -1
