"""AccessMiddleware: who is calling (API key), may they (limits), and the call's end reaching its sinks.

Owns the order of the checks around every API route except the public ones (``/health``, ``/ready``,
``/openapi.json``, ``/metrics`` when public): open a ``Call`` with the sinks → authenticate (401) → admit
under the key's limits (429 with ``Retry-After`` and ``x-ratelimit-*``) → run the route → release the limits
with what the call really used.  It never reads response bytes: the call's end is an event (``Call.end``).
A stream ends its call itself before ``[DONE]``; any other response ends it when its headers go out, so the
audit row is committed before the first byte of a blocking answer; a call still open when the app returns
ended without a response (499 ``client_disconnected``, or 500 when the app failed).  When the audit sink
cannot keep a call, a blocking answer is replaced by 503 ``audit_unavailable`` (a stream sends that error
instead of a clean end).

Every response, public routes and errors included, carries ``x-request-id`` (the audit row's id): the
client's own ``X-Request-ID`` when it sent a usable one (``request_id.py`` says how ids relate), and every
log line emitted while the call runs carries it too.  While the server drains (SIGTERM, ``drain.py``), API
calls are refused with 503 ``server_draining`` and ``Retry-After``; the calls admitted before are counted
until they end, so the drain knows when nothing is in flight.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from inhouse.audit.record import AuditRecord
from inhouse.audit.writer import AuditWriter
from inhouse.errors import ErrorCode, InhouseError
from inhouse.keys.limiter import Admission, Limiter, MemoryLimiter
from inhouse.keys.store import ApiKey, KeyStore
from inhouse.server.call import Call, CallSink
from inhouse.server.drain import Drain
from inhouse.server.render import error_response
from inhouse.server.request_id import bind, client_request_id, unbind
from inhouse.server.sinks import audit_unavailable
from inhouse.server.tls import client_subject
from inhouse.storage.database import Database

__all__ = ["AccessMiddleware", "AccessParts"]

log = logging.getLogger("inhouse.access")

Scope = dict[str, Any]
Message = MutableMapping[str, Any]


@dataclass(frozen=True)
class AccessParts:
    """What the middleware and the admin routes use, built by the CLI from the settings."""

    db: Database | None = None
    keys: KeyStore | None = None  # None: auth is off
    limiter: Limiter = field(default_factory=MemoryLimiter)
    audit: AuditWriter | None = None  # None: no audit log


class AccessMiddleware:
    def __init__(self, app: Any, *, keys: KeyStore | None, limiter: Limiter, sinks: tuple[CallSink, ...],
                 public_paths: frozenset[str], keep_text: bool, drain: Drain | None = None,
                 public_prefixes: tuple[str, ...] = ()) -> None:
        self.app = app
        self._keys = keys
        self._limiter = limiter
        self._sinks = sinks
        self._public = public_paths
        self._public_prefixes = public_prefixes  # the console's static files
        self._keep_text = keep_text
        self._drain = drain or Drain()
        self._ids = 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self._ids += 1
        given = client_request_id(scope.get("headers", []))
        request_id = given or f"req-{id(self) & 0xffff:04x}{self._ids:08x}"
        if scope["path"] in self._public or scope["path"].startswith(self._public_prefixes):
            token = bind(_Named(request_id))
            try:
                await self._public_route(scope, receive, send, request_id)
            finally:
                unbind(token)
            return
        client = scope.get("client")
        record = AuditRecord(at=time.time(), request_id=request_id,
                             method=scope["method"], path=scope["path"], client_ip=client[0] if client else None,
                             client_subject=client_subject(scope))
        call = Call(record, self._sinks, keep_text=self._keep_text, named=given is not None)
        scope.setdefault("state", {})["call"] = call
        token = bind(record)  # the record, not its id: a route may still settle the id (a completion's)
        try:
            if self._drain.draining:
                call.failed(ErrorCode.SERVER_DRAINING)
                error = InhouseError(ErrorCode.SERVER_DRAINING, "the server is shutting down; retry the request "
                                     "(another replica will answer it)", retry_after=_DRAIN_RETRY_AFTER)
                await error_response(error)(scope, receive, _Exchange(call, None, scope, send).send)
                return
            self._drain.enter()
            try:
                await self._admitted(scope, receive, send, call)
            finally:
                self._drain.leave()
        finally:
            unbind(token)

    async def _public_route(self, scope: Scope, receive: Any, send: Any, request_id: str) -> None:
        """No key, no audit row; a bug is one traceback and a 500 (with the id), never re-raised, as on the API
        routes, so the client's keep-alive connection survives it."""
        sending = _with_request_id(send, lambda: request_id)
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await sending(message)

        try:
            await self.app(scope, receive, watched)
        except Exception:
            log.exception("unhandled error on %s %s (%s)", scope["method"], scope["path"], request_id)
            if not started:
                error = InhouseError(ErrorCode.INTERNAL, "internal server error; see the server log")
                await error_response(error)(scope, receive, watched)

    async def _admitted(self, scope: Scope, receive: Any, send: Any, call: Call) -> None:
        """Authenticate, admit under the key's limits, run the route, end the call, release the limits."""
        record = call.record
        admission: Admission | None = None
        try:
            call.key = await self._authenticate(scope)
            if call.key is not None:
                record.key_id, record.key_name = call.key.id, call.key.name
                admission = await self._limiter.acquire(call.key)
                if call.key.limits.token_budget is not None:
                    call.budget = functools.partial(self._limiter.reserve, call.key, admission)
        except InhouseError as exc:
            call.failed(exc.code)
            await error_response(exc)(scope, receive, _Exchange(call, None, scope, send).send)
            return
        exchange = _Exchange(call, admission, scope, send)
        try:
            await self.app(scope, receive, exchange.send)
        except Exception:
            # a bug, not the client's doing: one traceback in the log, a 500 if nothing was sent yet, and
            # nothing re-raised, so the server keeps the client's keep-alive connection
            log.exception("unhandled error on %s %s (%s)", record.method, record.path, record.request_id)
            call.failed(ErrorCode.INTERNAL)
            if not exchange.started:
                error = InhouseError(ErrorCode.INTERNAL, "internal server error; see the server log")
                await error_response(error)(scope, receive, exchange.send)
            await call.end(500)
        finally:
            if not call.ended:  # the app returned without an answer, or a stream stopped early: the client left
                call.failed(ErrorCode.CLIENT_DISCONNECTED)
                await call.end(499)
            if admission is not None and call.key is not None:
                await self._limiter.release(call.key, admission, call.tokens)

    async def _authenticate(self, scope: Scope) -> ApiKey | None:
        if self._keys is None:
            return None
        secret = _presented_secret(scope)
        if secret is None:
            raise InhouseError(ErrorCode.INVALID_API_KEY,
                               "no API key: send it as 'Authorization: Bearer <key>' (inhouse keys create makes one)")
        hit, key = self._keys.cached(secret)
        if not hit:
            key = await asyncio.to_thread(self._keys.find_secret, secret)
            self._keys.remember(secret, key)
        if key is None:
            raise InhouseError(ErrorCode.INVALID_API_KEY, "the API key is not valid")
        if key.revoked_at is not None:
            raise InhouseError(ErrorCode.INVALID_API_KEY, f"the API key {key.prefix}... was revoked")
        if not key.usable(time.time()):
            raise InhouseError(ErrorCode.INVALID_API_KEY, f"the API key {key.prefix}... has expired")
        return key


_DRAIN_RETRY_AFTER = 5  # seconds; a load balancer has moved on to another replica by then


@dataclass(frozen=True)
class _Named:
    """The id of a call on a public route (which has no record), for its log lines."""

    request_id: str


class _Exchange:
    """The ``send`` of one call: adds ``x-request-id`` and rate-limit headers, and ends a call that is not a
    stream when its response starts (replacing it with 503 ``audit_unavailable`` if the call was not kept)."""

    def __init__(self, call: Call, admission: Admission | None, scope: Scope, send: Any) -> None:
        self._call, self._scope, self._send = call, scope, send
        self._headers = admission.headers if admission is not None else {}
        self._dropping = False  # the app's answer was replaced: drop its body
        self.started = False

    async def send(self, message: Message) -> None:
        if self._dropping:
            return
        if message["type"] == "http.response.start":
            self.started = True
            call = self._call
            if not call.streaming and not await call.end(message["status"]):
                self._dropping = True
                error = audit_unavailable()
                call.record.error_code = error.code.value
                await error_response(error)(self._scope, _no_receive, self._send_with_headers)
                return
            await self._send_with_headers(message)
            return
        await self._send(message)

    async def _send_with_headers(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = _add_request_id(list(message.get("headers", [])), self._call.record.request_id)
            headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self._headers.items()]
            message = {**message, "headers": headers}
        await self._send(message)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def _add_request_id(headers: list[tuple[bytes, bytes]], request_id: str) -> list[tuple[bytes, bytes]]:
    """The headers with exactly one ``x-request-id``: the call's (a route's own is replaced by it)."""
    kept = [(k, v) for k, v in headers if k.lower() != b"x-request-id"]
    kept.append((b"x-request-id", request_id.encode("latin-1")))
    return kept


def _with_request_id(send: Any, request_id: Callable[[], str]) -> Any:
    """``send`` that adds ``x-request-id`` to a response that has none."""
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": _add_request_id(list(message.get("headers", [])), request_id())}
        await send(message)

    return sending


def _presented_secret(scope: Scope) -> str | None:
    """The key from ``Authorization: Bearer`` or ``x-api-key``; an empty header counts as none (Dify sends one)."""
    headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
    for name, value in headers:
        if name == b"authorization":
            text = value.decode("latin-1").strip()
            if text[:7].lower() == "bearer ":
                text = text[7:].strip()
            elif text.lower() == "bearer":
                text = ""
            if text:
                return text
        elif name == b"x-api-key":
            text = value.decode("latin-1").strip()
            if text:
                return text
    return None
