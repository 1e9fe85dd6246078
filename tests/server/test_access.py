"""AccessMiddleware's half of the call-end event, on raw ASGI (no model, no HTTP server).

A blocking answer's call ends, and its sinks have the row, before the first byte goes out; a call the audit
sink cannot keep is answered 503 ``audit_unavailable`` instead of the app's answer; a stream ends its own
call, whatever its bytes say (the middleware reads none); an app that returns without answering is 499
``client_disconnected``, one that fails is 500.  Each call reaches the sinks exactly once.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
import pytest
from starlette.requests import Request

from inhouse.audit.record import AuditRecord
from inhouse.keys.limiter import MemoryLimiter
from inhouse.server.access import AccessMiddleware
from inhouse.server.call import Call, call_of

Message = MutableMapping[str, Any]
App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


class Timeline:
    """What happened, in order: the sinks' calls and the messages sent to the client."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def sink(self, keeps: bool = True) -> Callable[[AuditRecord], Awaitable[bool]]:
        async def sink(record: AuditRecord) -> bool:
            self.events.append(("sink", (record.status, record.error_code)))
            return keeps

        return sink

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.events.append(("start", message["status"]))
        else:
            self.events.append(("body", message.get("body", b"")))

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]

    def sunk(self) -> list[Any]:
        return [what for kind, what in self.events if kind == "sink"]

    def body(self) -> bytes:
        return b"".join(what for kind, what in self.events if kind == "body")


async def run(app: App, timeline: Timeline, keeps: bool = True) -> None:
    middleware = AccessMiddleware(app, keys=None, limiter=MemoryLimiter(), sinks=(timeline.sink(keeps),),
                                  public_paths=frozenset({"/health"}), keep_text=False)
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [],
             "client": ("127.0.0.1", 1234)}

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    await middleware(scope, receive, timeline.send)


def the_call(scope: dict[str, Any]) -> Call:
    call = call_of(Request(scope))
    assert call is not None
    return call


async def answer(send: Any, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type)]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def test_a_blocking_answer_is_in_the_sinks_before_its_first_byte() -> None:
    timeline = Timeline()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await answer(send, 200, b'{"ok": true}')

    await run(app, timeline)
    assert timeline.kinds() == ["sink", "start", "body"]
    assert timeline.sunk() == [(200, None)]


async def test_a_call_the_audit_sink_cannot_keep_is_503_and_the_answer_never_leaves() -> None:
    timeline = Timeline()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await answer(send, 200, b'{"answer": "the secret"}')

    await run(app, timeline, keeps=False)
    assert [what for kind, what in timeline.events if kind == "start"] == [503]
    assert b"the secret" not in timeline.body()
    assert orjson.loads(timeline.body())["error"]["code"] == "audit_unavailable"
    assert len(timeline.sunk()) == 1


async def test_a_stream_ends_its_own_call_whatever_its_bytes_say() -> None:
    """No ``[DONE]``, no event-stream content type: the call ended when the stream said so, as a success."""
    timeline = Timeline()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        call = the_call(scope)
        call.streaming = True
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"part one ", "more_body": True})
        assert await call.end(200)
        await send({"type": "http.response.body", "body": b"last", "more_body": False})

    await run(app, timeline)
    assert timeline.kinds() == ["start", "body", "sink", "body"]
    assert timeline.sunk() == [(200, None)]


async def test_a_stream_that_stops_before_ending_its_call_is_a_client_that_left() -> None:
    timeline = Timeline()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        the_call(scope).streaming = True
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True})

    await run(app, timeline)
    assert timeline.sunk() == [(499, "client_disconnected")]


async def test_an_app_that_returns_without_answering_ends_the_call_as_499() -> None:
    timeline = Timeline()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        return None

    await run(app, timeline)
    assert timeline.events == [("sink", (499, "client_disconnected"))]


async def test_an_app_that_fails_is_a_500_that_names_nothing_of_the_bug(caplog: pytest.LogCaptureFixture) -> None:
    timeline = Timeline()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise RuntimeError("the internal detail")

    with caplog.at_level(logging.ERROR, logger="inhouse.access"):
        await run(app, timeline)
    assert timeline.sunk() == [(500, "internal_error")]
    assert timeline.kinds() == ["sink", "start", "body"]
    assert b"the internal detail" not in timeline.body()
    assert orjson.loads(timeline.body())["error"]["code"] == "internal_error"
    assert "the internal detail" in caplog.text  # one traceback in the server log


async def test_a_public_route_opens_no_call() -> None:
    timeline = Timeline()
    seen: list[Call | None] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(call_of(Request(scope)))
        await answer(send, 200, b"{}")

    middleware = AccessMiddleware(app, keys=None, limiter=MemoryLimiter(), sinks=(timeline.sink(),),
                                  public_paths=frozenset({"/health"}), keep_text=False)
    scope = {"type": "http", "method": "GET", "path": "/health", "headers": []}
    await middleware(scope, None, timeline.send)
    assert seen == [None] and timeline.kinds() == ["start", "body"]
