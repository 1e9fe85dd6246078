"""Incremental detokenization and stop-string matching for one sequence.

Owns the rule that no text leaves a sequence before it is final: a token that ends inside a UTF-8
character is held back until the character completes (and dropped if generation ends first), and text
that could be the start of a stop string is held back until it is known not to be one.  Holds no model
state.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["IncrementalDetokenizer", "StopMatcher"]

_REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 6


class _Tokenizer(Protocol):
    def decode(
        self, ids: list[int], skip_special_tokens: bool = ..., clean_up_tokenization_spaces: bool = ...
    ) -> str: ...


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a character.

    Decodes a short window (a few context tokens, then the unread ones) rather than the whole output,
    so each step costs O(window), and the first output token is decoded after prompt context so that
    tokenizers which drop a leading space at the start of a string still produce it.
    """

    def __init__(self, tokenizer: _Tokenizer, prompt_ids: list[int]) -> None:
        self._tok = tokenizer
        self._ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one token; return the text that is now final (possibly empty)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        if len(full_text) > len(prefix_text) and not full_text.endswith(_REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            return full_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """At the end of generation: the held-back text, without a character the last tokens left unfinished.

        Text is held back only while it decodes to a trailing U+FFFD, and an unfinished UTF-8 sequence at the
        end decodes to exactly one, so that one is dropped: a length limit or stop token that falls inside a
        character never shows a replacement character the model did not write (its tokens still count).
        A U+FFFD the model did write is sent once text follows it; only as the very last character is it
        indistinguishable, from text alone, from an unfinished one, and dropped as tokenizers' DecodeStream
        (and so vLLM) drops it.
        """
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        held = full_text[len(prefix_text) :] if len(full_text) > len(prefix_text) else ""
        return held.removesuffix(_REPLACEMENT)


class StopMatcher:
    """Cuts output at the first stop string, matching across delta boundaries.

    ``feed`` returns the text safe to send now and whether a stop string was hit.  Text that might be
    the beginning of a stop string stays buffered until the next feed or ``flush``.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._buffer = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self._stops:
            return text, False
        self._buffer += text
        first = -1
        for stop in self._stops:
            at = self._buffer.find(stop)
            if at != -1 and (first == -1 or at < first):
                first = at
        if first != -1:
            out, self._buffer = self._buffer[:first], ""
            return out, True
        keep = self._held_back()
        out = self._buffer[: len(self._buffer) - keep]
        self._buffer = self._buffer[len(self._buffer) - keep :]
        return out, False

    def _held_back(self) -> int:
        """Length of the longest buffer suffix that is a proper prefix of some stop string."""
        for size in range(min(len(self._buffer), self._longest - 1), 0, -1):
            tail = self._buffer[-size:]
            if any(stop.startswith(tail) for stop in self._stops):
                return size
        return 0

    def flush(self) -> str:
        out, self._buffer = self._buffer, ""
        return out
