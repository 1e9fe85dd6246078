"""An upstream's chat and completions stream chunks, read into Deltas: ``parse_chunk`` and ``Relay``.

``parse_chunk`` checks one ``data:`` payload field by field into a ``Chunk`` (text, reasoning, raw tool-call
pieces, finish, usage); anything of the wrong shape raises ``BadChunkError``, whose ``reason`` is written for
the client, never another exception.  Reasoning is ``delta.reasoning`` (vLLM ≥ 0.10) or the older
``delta.reasoning_content``: whichever is present, never both.  Legacy ``delta.function_call`` is one more
tool-call piece.

``Relay`` holds what spans chunks: it numbers tool calls the way the engine seam wants them (the first piece
of call ``index`` carries its id and name, argument fragments follow, calls never interleave) whatever the
upstream did (``index`` left out, the ``id`` repeated on every piece, a whole call in one chunk), and keeps the
usage: the upstream's when sent, else one token per chunk that said anything.  The upstream's
``usage.prompt_tokens_details.cached_tokens`` is passed on when it is a whole number from 0 to the prompt's
tokens; anything else there is ignored (it is a detail, not worth failing an answer for).

Holds no I/O: the engine (``upstream.py``) reads the stream and decides what a bad chunk costs.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import orjson

from inhouse.engine.base import Delta, Generation, ToolCallDelta, Usage

__all__ = ["BadChunkError", "Chunk", "RawToolCall", "Relay", "parse_chunk"]

_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "function_call": "tool_calls"}


class BadChunkError(Exception):
    """The upstream sent something that is not a chunk of an answer; ``reason`` is written for the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class RawToolCall:
    """One tool-call piece as the upstream sent it (``index`` and ``id`` may be missing or repeated)."""

    index: int | None = None
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class Chunk:
    """What one upstream chunk says: new text, reasoning and tool-call pieces, whether (and why) the choice
    finished, and any usage."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    reasoning: str = ""
    tool_calls: tuple[RawToolCall, ...] = ()
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, when a whole number ≥ 0


def parse_chunk(data: bytes) -> Chunk:
    """One ``data:`` payload of a chat or completions stream, checked field by field; raises BadChunkError."""
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise BadChunkError("sent a chunk that is not JSON") from None
    if not isinstance(payload, dict):
        raise BadChunkError("sent a chunk that is not a JSON object")
    if payload.get("error") is not None:
        raise BadChunkError("sent an error event")
    prompt, completion = _usage(payload.get("usage"))
    cached = _cached(payload.get("usage"))
    choices = payload.get("choices")
    if choices is None:
        choices = []
    if not isinstance(choices, list):
        raise BadChunkError("sent a chunk whose choices is not a list")
    if not choices:
        return Chunk(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached)
    choice = choices[0]
    if not isinstance(choice, dict):
        raise BadChunkError("sent a chunk whose choice is not an object")
    finish = choice.get("finish_reason")
    if not isinstance(finish, str | None):
        raise BadChunkError("sent a chunk whose finish_reason is not a string")
    if "delta" not in choice:
        text = choice.get("text")
        if not isinstance(text, str | None):
            raise BadChunkError("sent a chunk whose text is not a string")
        return Chunk(text or "", finish or None, prompt, completion, cached_tokens=cached)
    delta = choice["delta"] if choice["delta"] is not None else {}
    if not isinstance(delta, dict):
        raise BadChunkError("sent a chunk whose delta is not an object")
    text, reasoning = delta.get("content"), delta.get("reasoning")
    if reasoning is None:
        reasoning = delta.get("reasoning_content")
    if not isinstance(text, str | None) or not isinstance(reasoning, str | None):
        raise BadChunkError("sent a chunk whose content or reasoning is not a string")
    return Chunk(text or "", finish or None, prompt, completion, reasoning or "", _tool_calls(delta), cached)


def _usage(usage: object) -> tuple[int | None, int | None]:
    if usage is None:
        return None, None
    if not isinstance(usage, dict):
        raise BadChunkError("sent a chunk whose usage is not an object")
    counts = usage.get("prompt_tokens"), usage.get("completion_tokens")
    for count in counts:
        if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 0):
            raise BadChunkError("sent a chunk whose token counts are not whole numbers")
    return counts


def _cached(usage: object) -> int | None:
    """``usage.prompt_tokens_details.cached_tokens`` if it is a whole number ≥ 0, else None (ignored)."""
    details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return cached if isinstance(cached, int) and not isinstance(cached, bool) and cached >= 0 else None


def _tool_calls(delta: dict[str, object]) -> tuple[RawToolCall, ...]:
    """``delta.tool_calls`` (``[{index?, id?, type?, function: {name?, arguments?}}]``), or legacy
    ``delta.function_call`` (``{name?, arguments?}``) as one piece."""
    calls, legacy = delta.get("tool_calls"), delta.get("function_call")
    if calls is None and legacy is not None:
        calls = [{"function": legacy}]
    if calls is None:
        return ()
    if not isinstance(calls, list):
        raise BadChunkError("sent a chunk whose tool_calls is not a list")
    return tuple(_tool_call(call) for call in calls)


def _tool_call(call: object) -> RawToolCall:
    if not isinstance(call, dict):
        raise BadChunkError("sent a tool call that is not an object")
    function = call.get("function") if call.get("function") is not None else {}
    if not isinstance(function, dict):
        raise BadChunkError("sent a tool call whose function is not an object")
    index, call_id = call.get("index"), call.get("id")
    name, arguments = function.get("name"), function.get("arguments")
    if index is not None and (not isinstance(index, int) or isinstance(index, bool) or index < 0):
        raise BadChunkError("sent a tool call whose index is not a whole number")
    if not isinstance(call_id, str | None) or not isinstance(name, str | None):
        raise BadChunkError("sent a tool call whose id or name is not a string")
    if isinstance(arguments, dict):  # some servers send the arguments object itself: it is JSON all the same
        arguments = orjson.dumps(arguments).decode()
    if not isinstance(arguments, str | None):
        raise BadChunkError("sent a tool call whose arguments are not a string")
    return RawToolCall(index, call_id or None, name or None, arguments or "")


@dataclass(slots=True)
class _Call:
    """A tool call being relayed: the upstream's index and id for it (to know its later pieces)."""

    upstream_index: int | None
    upstream_id: str | None
    has_arguments: bool = False


class Relay:
    """Turns one choice's chunks into Deltas and keeps its usage: the upstream's when sent, else counted.

    Upstreams report usage with the finishing chunk or in a ``choices: []`` chunk after it, so the
    finishing Delta is held until the stream ends; then ``settle`` gives it the choice's Usage: the upstream's
    prompt tokens (else the admission estimate), its completion tokens (else the chunks counted), and its cached
    prompt tokens when it sent them (and they are no more than the prompt tokens).
    """

    def __init__(self) -> None:
        self.counted = 0
        self.prompt: int | None = None
        self.reported: int | None = None
        self.cached: int | None = None
        self._calls: list[_Call] = []

    def add(self, chunk: Chunk) -> Delta | None:
        """The Delta of a chunk, or None when it says nothing new; raises BadChunkError for tool-call pieces
        that cannot be placed."""
        if chunk.prompt_tokens is not None:
            self.prompt = chunk.prompt_tokens
        if chunk.completion_tokens is not None:
            self.reported = chunk.completion_tokens
        if chunk.cached_tokens is not None:
            self.cached = chunk.cached_tokens
        pieces = [piece for raw in chunk.tool_calls for piece in self._place(raw)]
        said = bool(chunk.text or chunk.reasoning or pieces)
        if not said and chunk.finish_reason is None:
            return None
        self.counted += said
        finish = chunk.finish_reason
        reason = None if finish is None else _FINISH.get(finish, "stop")
        if reason == "stop" and self._calls:  # e.g. Ollama: the answer was tool calls all the same
            reason = "tool_calls"
        return Delta(text=chunk.text, token_count=int(said), finish_reason=reason, reasoning=chunk.reasoning,
                     tool_calls=pieces or None)

    def settle(self, finishing: Delta, generation: Generation) -> Delta:
        closing = self._closed_empty()
        if closing:
            finishing.tool_calls = (finishing.tool_calls or []) + closing
        if self.reported is not None:
            finishing.token_count += self.reported - self.counted
        prompt = self.prompt if self.prompt is not None else generation.prompt_tokens
        cached = self.cached if self.cached is not None and self.cached <= prompt else None
        finishing.usage = Usage(prompt, self.reported if self.reported is not None else self.counted, cached)
        return finishing

    def _closed_empty(self) -> list[ToolCallDelta]:
        """``"{}"`` for the current call if the upstream sent it no arguments at all: Dify's agent ``json.loads``
        a call's joined arguments, and ``""`` does not parse."""
        current = self._calls[-1] if self._calls else None
        if current is None or current.has_arguments:
            return []
        current.has_arguments = True
        return [ToolCallDelta(len(self._calls) - 1, arguments="{}")]

    def _place(self, raw: RawToolCall) -> list[ToolCallDelta]:
        """The seam's pieces for ``raw``: a new call when there is none yet, or it names another upstream index,
        or another id and a name (a fresh id on every fragment is not a new call), after ``"{}"`` for the
        previous call if it had no arguments; else the current call's argument fragment (none when empty)."""
        current = self._calls[-1] if self._calls else None
        new = (current is None or (raw.index is not None and raw.index != current.upstream_index)
               or (raw.id is not None and raw.name is not None and raw.id != current.upstream_id))
        if not new and current is not None:
            current.has_arguments = current.has_arguments or bool(raw.arguments)
            return [ToolCallDelta(len(self._calls) - 1, arguments=raw.arguments)] if raw.arguments else []
        if raw.index is not None and current is not None and raw.index != current.upstream_index \
                and any(call.upstream_index == raw.index for call in self._calls):
            raise BadChunkError("sent tool-call pieces of different calls interleaved")
        if raw.name is None:
            raise BadChunkError("sent a tool call without a function name")
        closing = self._closed_empty()
        self._calls.append(_Call(raw.index, raw.id, bool(raw.arguments)))
        return [*closing, ToolCallDelta(len(self._calls) - 1, id=raw.id or f"call_{uuid.uuid4().hex[:24]}",
                                        name=raw.name, arguments=raw.arguments)]
