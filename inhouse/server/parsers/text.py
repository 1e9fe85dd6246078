"""Text helpers the parsers share: how much of a piece could still open a tag, and whitespace held at the edges.

Holds no parser state of its own beyond one ``Trimmed`` run.
"""

from __future__ import annotations

__all__ = ["Trimmed", "partial_tag"]


def partial_tag(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that is a proper start of ``tag`` (to hold back)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


class Trimmed:
    """A run of text with its leading whitespace dropped (optionally) and its trailing whitespace held back until
    more text follows it: the edges of a thinking block or of the text around tool calls are not content.  Adding
    ``a`` then ``b`` gives what adding ``a + b`` gives."""

    def __init__(self, strip_leading: bool = True) -> None:
        self._started = not strip_leading
        self._held = ""

    def add(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        text = self._held + text
        body = text.rstrip()
        self._held = text[len(body):]
        return body

    def held(self) -> str:
        """The trailing whitespace held so far (given up: it is not held any more)."""
        held, self._held = self._held, ""
        return held

    def restart(self) -> None:
        """Drop what is held and strip the leading whitespace of what follows."""
        self._started = False
        self._held = ""
