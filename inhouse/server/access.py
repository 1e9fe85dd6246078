"""AccessMiddleware: who is calling (API key), may they (limits), and the audit row of every call.

Owns the order of the checks around every API route except the public ones (``/health``, ``/ready``,
``/metrics`` when public): open a ``Call`` → authenticate (401) → admit under the key's limits (429
with ``Retry-After`` and ``x-ratelimit-*``) → run the route → audit.  The audit row is committed
before the call's last byte is sent: a blocking response is held until its row is written, a stream's
``data: [DONE]`` waits for its row.  If the row cannot be written the answer is not acknowledged (a
blocking call gets 503 ``audit_unavailable``; a stream gets an error event instead of a clean end).

Every response, public routes and errors included, carries ``x-request-id`` (the audit row's id).  A
client that leaves early (while uploading, while a blocking answer is generated, or mid-stream) has one
outcome: 499 ``client_disconnected`` in its audit row and one short log line, never a traceback.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from inhouse.audit.record import AuditRecord
from inhouse.audit.writer import AuditUnavailableError, AuditWriter
from inhouse.errors import ErrorCode, InhouseError
from inhouse.keys.limiter import Admission, Limiter, MemoryLimiter
from inhouse.keys.store import ApiKey, KeyStore
from inhouse.server.call import Call
from inhouse.server.render import error_response
from inhouse.server.sse import DONE, event
from inhouse.storage.database import Database

__all__ = ["AccessMiddleware", "AccessParts"]

log = logging.getLogger("inhouse.access")

Scope = dict[str, Any]
Message = dict[str, Any]


@dataclass(frozen=True)
class AccessParts:
    """What the middleware and the admin routes use, built by the CLI from the settings."""

    db: Database | None = None
    keys: KeyStore | None = None  # None: auth is off
    limiter: Limiter = field(default_factory=MemoryLimiter)
    audit: AuditWriter | None = None  # None: no audit log


class AccessMiddleware:
    def __init__(self, app: Any, *, keys: KeyStore | None, limiter: Limiter, audit: AuditWriter | None,
                 public_paths: frozenset[str], keep_text: bool) -> None:
        self.app = app
        self._keys = keys
        self._limiter = limiter
        self._audit = audit
        self._public = public_paths
        self._keep_text = keep_text
        self._ids = 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self._ids += 1
        request_id = f"req-{id(self) & 0xffff:04x}{self._ids:08x}"
        if scope["path"] in self._public:
            await self.app(scope, receive, _with_request_id(send, lambda: request_id))
            return
        client = scope.get("client")
        record = AuditRecord(at=time.time(), request_id=request_id,
                             method=scope["method"], path=scope["path"], client_ip=client[0] if client else None)
        call = Call(record, keep_text=self._keep_text)
        scope.setdefault("state", {})["call"] = call
        admission: Admission | None = None
        try:
            call.key = await self._authenticate(scope)
            if call.key is not None:
                record.key_id, record.key_name = call.key.id, call.key.name
                admission = await self._limiter.acquire(call.key)
                if call.key.limits.token_budget is not None:
                    call.budget = functools.partial(self._limiter.reserve, call.key, admission)
        except InhouseError as exc:
            record.status, record.error_code = exc.status, exc.code.value
            if not await self._write(call):
                exc = _audit_down()
            await error_response(exc)(scope, receive, _with_request_id(send, lambda: record.request_id))
            return
        exchange = _Exchange(self, call, admission, scope, send)
        failed = False
        try:
            await self.app(scope, receive, exchange.send)
        except Exception:
            # a bug, not the client's doing: one traceback in the log, a 500 if nothing was sent yet, and
            # nothing re-raised, so the server keeps the client's keep-alive connection
            log.exception("unhandled error on %s %s (%s)", record.method, record.path, record.request_id)
            failed = True
            record.status, record.error_code = 500, ErrorCode.INTERNAL.value
            if not exchange.sent:
                error = InhouseError(ErrorCode.INTERNAL, "internal server error; see the server log")
                reply: Any = exchange.send
                await error_response(error)(scope, receive, reply)
        finally:
            if not exchange.audited and not failed:  # the app returned without finishing: the client left
                record.status, record.error_code = 499, ErrorCode.CLIENT_DISCONNECTED.value
            if not exchange.audited:
                await self._write(call)
            if record.error_code == ErrorCode.CLIENT_DISCONNECTED.value:
                log.info("client disconnected: %s %s (%s)", record.method, record.path, record.request_id)
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

    async def _write(self, call: Call) -> bool:
        """Commit the call's row; False if it could not be (the caller must not acknowledge the call)."""
        record = call.record
        record.latency_ms = round((time.monotonic() - call.started) * 1000, 3)
        if self._audit is None:
            return True
        try:
            await self._audit.write(record)
        except AuditUnavailableError:
            return False
        return True


class _Exchange:
    """The ``send`` of one audited call: adds rate-limit headers, holds the last byte until audited."""

    def __init__(self, owner: AccessMiddleware, call: Call, admission: Admission | None, scope: Scope,
                 send: Any) -> None:
        self._owner, self._call, self._scope, self._send = owner, call, scope, send
        self._headers = admission.headers if admission is not None else {}
        self._start: Message | None = None
        self._streaming = False
        self._body: list[bytes] = []
        self.audited = False
        self.sent = False  # something reached the client (a stream's headers, or the whole blocking answer)

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self._call.record.status = message["status"]
            headers = _add_request_id(list(message.get("headers", [])), self._call.record.request_id)
            headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self._headers.items()]
            message = {**message, "headers": headers}
            content_type = next((v for k, v in headers if k.lower() == b"content-type"), b"")
            self._streaming = content_type.startswith(b"text/event-stream")
            if self._streaming:
                self.sent = True
                await self._send(message)
            else:
                self._start = message  # held until the row is written
            return
        if message["type"] != "http.response.body":
            await self._send(message)
            return
        if self._streaming:
            if message.get("body") == DONE and not self.audited:
                self.audited = True
                if not await self._owner._write(self._call):
                    await self._send({"type": "http.response.body", "body": event(_audit_down().to_dict()),
                                      "more_body": True})
            await self._send(message)
            return
        self._body.append(message.get("body", b""))
        if message.get("more_body"):
            return
        body = b"".join(self._body)
        record = self._call.record
        if record.status >= 400 and record.error_code is None:
            record.error_code = _error_code(body)
        self.audited = True
        if not await self._owner._write(self._call):
            await error_response(_audit_down())(self._scope, _no_receive, self._send)
            return
        assert self._start is not None
        self.sent = True
        await self._send(self._start)
        await self._send({"type": "http.response.body", "body": body, "more_body": False})


def _add_request_id(headers: list[tuple[bytes, bytes]], request_id: str) -> list[tuple[bytes, bytes]]:
    if not any(k.lower() == b"x-request-id" for k, _ in headers):
        headers.append((b"x-request-id", request_id.encode("latin-1")))
    return headers


def _with_request_id(send: Any, request_id: Callable[[], str]) -> Any:
    """``send`` that adds ``x-request-id`` to a response that has none."""
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": _add_request_id(list(message.get("headers", [])), request_id())}
        await send(message)

    return sending


def _presented_secret(scope: Scope) -> str | None:
    """The key from ``Authorization: Bearer`` or ``x-api-key``; an empty header counts as none (Dify sends one)."""
    for name, value in scope.get("headers", []):
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


def _error_code(body: bytes) -> str | None:
    try:
        code = orjson.loads(body)["error"]["code"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return str(code) if code is not None else None


def _audit_down() -> InhouseError:
    return InhouseError(ErrorCode.AUDIT_UNAVAILABLE, "the call could not be recorded in the audit log; "
                        "it was not completed. Retry later.", retry_after=5)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
