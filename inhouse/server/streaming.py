"""The SSE body of a streaming chat or completion: chunks in, ``data:`` events out.

Owns the order of events every client relies on: the opening chunk per choice, one chunk per
delta, the finish chunk, usage (on the last finish chunk always, and as a separate ``choices: []``
chunk when ``stream_options.include_usage`` asks), then ``[DONE]``.  An error after the first byte
becomes one ``data: {"error": ...}`` event followed by ``[DONE]``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from inhouse.engine.base import Delta, Generation
from inhouse.errors import ErrorCode, InhouseError
from inhouse.protocol.common import usage
from inhouse.server.call import Call
from inhouse.server.generation import merged
from inhouse.server.sse import DONE, event

__all__ = ["ChunkRenderer", "stream_events"]

log = logging.getLogger("inhouse.server")


class ChunkRenderer(Protocol):
    def opening(self, index: int) -> dict[str, Any] | None:
        """The first choice object of a choice (chat: the role), or None."""

    def choice(self, index: int, delta: Delta) -> dict[str, Any]: ...

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]: ...


async def stream_events(
    generations: list[Generation], prompt_tokens: Callable[[], int], include_usage: bool, render: ChunkRenderer,
    call: Call | None = None,
) -> AsyncIterator[bytes]:
    """``prompt_tokens`` is read when usage is sent: an upstream reports it only with its last chunk."""
    completion_tokens = 0
    finished = 0
    for index in range(len(generations)):
        opening = render.opening(index)
        if opening is not None:
            yield event(render.chunk([opening], None))
    try:
        async for index, delta in merged(generations):
            completion_tokens += delta.token_count
            if call is not None:
                call.output(delta.text, delta.token_count)
                if delta.finish_reason is not None:
                    call.finished(delta.finish_reason)
            if delta.finish_reason is None:
                if delta.text or delta.logprobs:
                    yield event(render.chunk([render.choice(index, delta)], None))
                continue
            finished += 1
            last = finished == len(generations)
            totals = usage(prompt_tokens(), completion_tokens) if last and not include_usage else None
            if last and call is not None:
                call.record.prompt_tokens = prompt_tokens()
            yield event(render.chunk([render.choice(index, delta)], totals))
        if include_usage:
            yield event(render.chunk([], usage(prompt_tokens(), completion_tokens)))
    except InhouseError as exc:
        if call is not None:
            call.failed(exc.code.value)
        yield event(exc.to_dict())
    except Exception:
        log.exception("stream failed after it started")
        if call is not None:
            call.failed(ErrorCode.INTERNAL.value)
        yield event(InhouseError(ErrorCode.INTERNAL, "the stream failed; the answer is incomplete").to_dict())
    yield DONE
