"""The ``think`` reasoning parser: ``<think>…</think>`` at the start of an answer is reasoning, the rest content.

Qwen3-style models open the block themselves; DeepSeek-R1-style templates open it in the prompt (``opened``), so
the answer starts inside it and only ``</think>`` appears.  An answer that does not start with ``<think>`` (and was
not opened) is content, untouched.  Content never carries the block's tags; the whitespace at the edges of the
block and at the start of the content after it is dropped.  Holds back only what could still be a tag.
"""

from __future__ import annotations

from inhouse.server.parsers.text import Trimmed, partial_tag

__all__ = ["ThinkParser"]

OPEN, CLOSE = "<think>", "</think>"


class ThinkParser:
    """``feed`` and ``finish`` return (reasoning, content) for the text given so far."""

    def __init__(self, opened: bool = False) -> None:
        self._opened = opened
        self._state = "start"  # start → thinking → after, or start → plain
        self._buf = ""
        self._reasoning = Trimmed()
        self._content = Trimmed()

    def feed(self, text: str) -> tuple[str, str]:
        if self._state == "plain":
            return "", text
        if self._state == "after":
            return "", self._content.add(text)
        self._buf += text
        if self._state == "start" and not self._decide():
            return "", ""
        if self._state == "plain":
            plain, self._buf = self._buf, ""
            return "", plain
        return self._thinking()

    def finish(self) -> tuple[str, str]:
        rest, self._buf = self._buf, ""
        if self._state == "start" and not self._opened:
            return "", rest
        if self._state in ("start", "thinking"):  # an unclosed block (cut by max_tokens) is all reasoning
            self._state = "after"
            return self._reasoning.add(rest), ""
        return "", self._content.held() if self._state == "after" else ""

    def _decide(self) -> bool:
        head = self._buf.lstrip()
        if head.startswith(OPEN):
            self._buf, self._state = head[len(OPEN):], "thinking"
        elif OPEN.startswith(head):
            return False  # still undecided
        else:
            self._state = "thinking" if self._opened else "plain"
        return True

    def _thinking(self) -> tuple[str, str]:
        end = self._buf.find(CLOSE)
        if end != -1:
            reasoning = self._reasoning.add(self._buf[:end])
            rest, self._buf, self._state = self._buf[end + len(CLOSE):], "", "after"
            return reasoning, self._content.add(rest)
        cut = len(self._buf) - partial_tag(self._buf, CLOSE)
        piece, self._buf = self._buf[:cut], self._buf[cut:]
        return self._reasoning.add(piece), ""
