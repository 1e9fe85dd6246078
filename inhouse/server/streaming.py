"""The SSE body of a streaming chat or completion: chunks in, ``data:`` events out.

Owns the order of events every client relies on: the opening chunk per choice, one chunk per
delta, the finish chunk, usage (on the last finish chunk always, and as a separate ``choices: []``
chunk when ``stream_options.include_usage`` asks), then the end of the call, then ``[DONE]``.  An error
after the first byte becomes one ``data: {"error": ...}`` event followed by ``[DONE]``; so does a call
its sinks could not keep (503 ``audit_unavailable``): the stream never ends cleanly unacknowledged.  A delta with
both thinking and other output is sent as two chunks, thinking first: a client that wraps thinking in
``<think>…</think>`` (Dify) closes the block on the first chunk without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

from inhouse.engine.base import Delta, Generation, Usage
from inhouse.errors import ErrorCode, InhouseError
from inhouse.protocol.common import usage
from inhouse.server.call import Call
from inhouse.server.generation import Parsers, audit_text, merged, total_usage
from inhouse.server.sinks import audit_unavailable
from inhouse.server.sse import DONE, event

__all__ = ["ChunkRenderer", "stream_events"]

log = logging.getLogger("inhouse.server")


class ChunkRenderer(Protocol):
    def opening(self, index: int) -> dict[str, Any] | None:
        """The first choice object of a choice (chat: the role), or None."""

    def choice(self, index: int, delta: Delta) -> dict[str, Any]: ...

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]: ...


def stream_events(generations: list[Generation], prompts_of: Callable[[Sequence[Usage]], Sequence[Usage]],
                  include_usage: bool,
                  render: ChunkRenderer, call: Call | None = None, parsers: Parsers = ()) -> AsyncIterator[bytes]:
    """The events of the stream.  The call (if any) is a stream from now on: it is ended by the stream itself,
    before ``[DONE]``.  ``prompts_of`` picks the usage of one choice per prompt (``total_usage``); ``parsers``
    (per choice) split each choice's text (``merged``)."""
    if call is not None:
        call.streaming = True
    return _events(generations, prompts_of, include_usage, render, call, parsers)


async def _events(generations: list[Generation], prompts_of: Callable[[Sequence[Usage]], Sequence[Usage]],
                  include_usage: bool, render: ChunkRenderer, call: Call | None,
                  parsers: Parsers) -> AsyncIterator[bytes]:
    usages: list[Usage | None] = [None] * len(generations)
    counted = [0] * len(generations)
    finish_reason: str | None = None
    error: InhouseError | None = None
    for index in range(len(generations)):
        opening = render.opening(index)
        if opening is not None:
            yield event(render.chunk([opening], None))
    try:
        async with contextlib.aclosing(merged(generations, parsers)) as deltas:  # closing the stream aborts at once
            async for index, delta in deltas:
                counted[index] += delta.token_count
                if call is not None:
                    call.output(audit_text(delta.text, delta.tool_calls), delta.token_count)
                if delta.reasoning and (delta.text or delta.tool_calls or delta.finish_reason is not None):
                    yield event(render.chunk([render.choice(index, Delta(reasoning=delta.reasoning))], None))
                    delta = dataclasses.replace(delta, reasoning="")
                if delta.finish_reason is None:
                    if delta.text or delta.reasoning or delta.tool_calls or delta.logprobs:
                        yield event(render.chunk([render.choice(index, delta)], None))
                    continue
                # engines send usage with the finishing delta; counted here only if one did not
                usages[index] = delta.usage or Usage(generations[index].prompt_tokens, counted[index])
                finish_reason = finish_reason or delta.finish_reason
                done = _all(usages)
                totals = _wire(total_usage(done, prompts_of)) if done and not include_usage else None
                yield event(render.chunk([render.choice(index, delta)], totals))
        done = _all(usages)
        if include_usage and done:
            yield event(render.chunk([], _wire(total_usage(done, prompts_of))))
    except InhouseError as exc:
        error = exc
    except Exception:
        log.exception("stream failed after it started")
        error = InhouseError(ErrorCode.INTERNAL, "the stream failed; the answer is incomplete")
    if call is not None:
        done = _all(usages)
        if done:  # the engines' own count of the whole answer
            call.used(total_usage(done, prompts_of), finish_reason)
        if error is not None:
            call.failed(error.code)
        if not await call.end(200):
            error = audit_unavailable()
    if error is not None:
        yield event(error.to_dict())
    yield DONE


def _all(usages: list[Usage | None]) -> list[Usage] | None:
    """Every choice's usage, once every choice finished."""
    done = [u for u in usages if u is not None]
    return done if len(done) == len(usages) else None


def _wire(total: Usage) -> dict[str, Any]:
    return usage(total.prompt_tokens, total.completion_tokens, total.cached_tokens)
