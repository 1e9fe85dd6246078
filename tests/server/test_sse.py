"""SSE framing and the keep-alive wrapper: comments in silences, the source never cut mid-chunk, always closed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest

from inhouse.errors import ErrorCode, InhouseError
from inhouse.server.sse import DONE, KEEPALIVE, event, sse_response, with_keepalive


class _Source:
    """An async byte stream that says what happened to it: chunks produced, cancelled, closed."""

    def __init__(self, chunks: list[bytes], pause: float = 0.0, then_raise: BaseException | None = None,
                 endless: bool = False) -> None:
        self.chunks, self.pause, self.then_raise, self.endless = chunks, pause, then_raise, endless
        self.produced = 0
        self.cancelled = False
        self.closed = False

    async def run(self) -> AsyncIterator[bytes]:
        try:
            index = 0
            while index < len(self.chunks) or self.endless:
                if self.pause:
                    await asyncio.sleep(self.pause)
                self.produced += 1
                yield self.chunks[index % len(self.chunks)]
                index += 1
            if self.then_raise is not None:
                raise self.then_raise
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        finally:
            self.closed = True


async def drain(stream: AsyncIterator[bytes]) -> list[bytes]:
    return [chunk async for chunk in stream]


def test_an_event_is_one_data_line_and_a_blank_line() -> None:
    framed = event({"a": 1, "text": "two\nlines", "ja": "日本語"})
    assert framed.startswith(b"data: ") and framed.endswith(b"\n\n")
    assert framed.count(b"\n") == 2 and b"\r" not in framed  # the payload's newline is escaped inside JSON
    assert orjson.loads(framed[len(b"data: "):-2]) == {"a": 1, "text": "two\nlines", "ja": "日本語"}
    assert "日本語".encode() in framed  # raw UTF-8, as Dify reads it


def test_done_and_keepalive_frames() -> None:
    assert DONE == b"data: [DONE]\n\n"
    assert KEEPALIVE.startswith(b":") and KEEPALIVE.endswith(b"\n\n")  # a comment: SSE parsers skip it


async def test_chunks_pass_through_in_order_when_the_source_is_quick() -> None:
    source = _Source([b"a", b"b", b"c"])
    assert await drain(with_keepalive(source.run(), interval=30)) == [b"a", b"b", b"c"]
    assert source.closed and not source.cancelled


async def test_keepalive_fills_a_silence() -> None:
    source = _Source([b"late", b"later"], pause=0.3)
    out = await drain(with_keepalive(source.run(), interval=0.05))
    assert [c for c in out if c != KEEPALIVE] == [b"late", b"later"]
    first = out.index(b"late")
    assert first >= 1 and set(out[:first]) == {KEEPALIVE}  # silence before the first chunk was filled
    assert KEEPALIVE in out[first + 1:out.index(b"later")]
    assert out[-1] == b"later"  # nothing after the source ended


async def test_a_timeout_never_cancels_the_source_mid_chunk() -> None:
    source = _Source([b"x", b"y", b"z"], pause=0.1)  # each chunk takes many intervals to produce
    out = await drain(with_keepalive(source.run(), interval=0.005))
    assert [c for c in out if c != KEEPALIVE] == [b"x", b"y", b"z"]
    assert not source.cancelled and source.produced == 3


async def test_the_source_is_not_read_ahead() -> None:
    source = _Source([b"."], endless=True)
    stream = with_keepalive(source.run(), interval=30)
    assert await anext(stream) == b"."
    await asyncio.sleep(0.1)  # a slow client: the source waits instead of running on
    assert source.produced <= 3  # one read, one in the one-slot queue, one waiting to be put
    await stream.aclose()  # type: ignore[attr-defined]
    assert source.closed


async def test_leaving_early_closes_the_source() -> None:
    source = _Source([b"1", b"2", b"3", b"4", b"5"])
    stream = with_keepalive(source.run(), interval=30)
    assert await anext(stream) == b"1"
    await stream.aclose()  # type: ignore[attr-defined]
    assert source.closed and source.produced < 5


async def test_leaving_during_a_silence_closes_the_source() -> None:
    source = _Source([b"never"], pause=60)
    stream = with_keepalive(source.run(), interval=0.01)
    assert await anext(stream) == KEEPALIVE
    async with asyncio.timeout(10):
        await stream.aclose()  # type: ignore[attr-defined]
    assert source.closed and source.produced == 0


async def test_a_source_error_is_raised_after_its_chunks() -> None:
    error = InhouseError(ErrorCode.ENGINE_ERROR, "broke")
    source = _Source([b"a"], then_raise=error)
    stream = with_keepalive(source.run(), interval=30)
    assert await anext(stream) == b"a"
    with pytest.raises(InhouseError) as raised:
        await anext(stream)
    assert raised.value is error and source.closed


def test_sse_response_is_an_event_stream_with_no_buffering() -> None:
    async def source() -> AsyncIterator[bytes]:
        yield DONE

    response = sse_response(source(), keepalive_seconds=5, headers={"x-request-id": "abc"})
    assert response.media_type is not None and response.media_type.startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    assert response.headers["x-request-id"] == "abc"


async def test_a_source_that_dies_of_a_base_exception_does_not_stream_keepalives_forever() -> None:
    async def dies() -> AsyncIterator[bytes]:
        yield b"first"
        raise asyncio.CancelledError  # an inner task's cancel leaking out, not the consumer's

    outcome = "hung"
    try:
        async with asyncio.timeout(2):
            await drain(with_keepalive(dies(), interval=0.05))
        outcome = "ended"
    except TimeoutError:
        outcome = "hung"
    except BaseException:
        outcome = "raised"
    assert outcome != "hung"
