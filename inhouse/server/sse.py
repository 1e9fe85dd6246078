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
    """``source``'s chunks, with a keep-alive comment after every ``interval`` seconds of silence.

    One task pulls the source into a one-slot queue, so the source is never cancelled mid-chunk by a
    timeout and is not read ahead (a slow client still makes the engine merge deltas).  Costs a queue
    hand-off and one timer per chunk, not a task per chunk.
    """
    queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(maxsize=1)

    async def pump() -> None:
        try:
            async for chunk in source:
                await queue.put(chunk)
        except Exception as exc:
            await queue.put(exc)
        else:
            await queue.put(None)

    task = asyncio.create_task(pump())
    try:
        while True:
            try:
                async with asyncio.timeout(interval):
                    item = await queue.get()
            except TimeoutError:
                if task.done() and queue.empty():  # the pump died of a BaseException and queued no end
                    raise RuntimeError("the stream's source stopped without ending") from None
                yield KEEPALIVE
                continue
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()


def sse_response(source: AsyncIterator[bytes], keepalive_seconds: float, headers: dict[str, str]) -> StreamingResponse:
    return StreamingResponse(
        with_keepalive(source, keepalive_seconds),
        media_type="text/event-stream; charset=utf-8",
        headers={**SSE_HEADERS, **headers},
    )
