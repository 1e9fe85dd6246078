"""Server-sent events exactly as Dify and the OpenAI SDK parse them.

Each event is ``data: <json>\\n\\n`` on one line (no ``event:``/``id:`` lines, no ``\\r\\n``).  Keep-alive
is a wrapper around any byte stream, not a branch inside it: while the source is silent for
``interval`` seconds it emits the comment ``: keep-alive\\n\\n``, which SSE parsers skip.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.responses import StreamingResponse

__all__ = ["DONE", "KEEPALIVE", "event", "sse_response", "with_keepalive"]

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def event(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def with_keepalive(source: AsyncIterator[bytes], interval: float) -> AsyncIterator[bytes]:
    iterator = source.__aiter__()
    pending: asyncio.Future[bytes] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(iterator.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield KEEPALIVE
                continue
            finished, pending = pending, None
            try:
                chunk = finished.result()
            except StopAsyncIteration:
                return
            yield chunk
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()


def sse_response(source: AsyncIterator[bytes], keepalive_seconds: float, headers: dict[str, str]) -> StreamingResponse:
    return StreamingResponse(
        with_keepalive(source, keepalive_seconds),
        media_type="text/event-stream; charset=utf-8",
        headers={**SSE_HEADERS, **headers},
    )
