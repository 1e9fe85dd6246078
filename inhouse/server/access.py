"""AccessMiddleware: who is calling (API key), may they (limits), and the audit row of every call.

Owns the order of the checks around every API route except the public ones (``/health``, ``/ready``,
``/metrics`` when public): open a ``Call`` → authenticate (401) → admit under the key's limits (429
with ``Retry-After`` and ``x-ratelimit-*``) → run the route → audit.  The audit row is committed
before the call's last byte is sent: a blocking response is held until its row is written, a stream's
``data: [DONE]`` waits for its row.  If the row cannot be written the answer is not acknowledged (a
blocking call gets 503 ``audit_unavailable``; a stream gets an error event instead of a clean end).
"""

from __future__ import annotations

import asyncio
import logging
import time
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
        if scope["type"] != "http" or scope["path"] in self._public:
            await self.app(scope, receive, send)
            return
        self._ids += 1
        client = scope.get("client")
        record = AuditRecord(at=time.time(), request_id=f"req-{id(self) & 0xffff:04x}{self._ids:08x}",
                             method=scope["method"], path=scope["path"], client_ip=client[0] if client else None)
        call = Call(record, keep_text=self._keep_text)
        scope.setdefault("state", {})["call"] = call
        admission: Admission | None = None
        try:
            call.key = await self._authenticate(scope)
            if call.key is not None:
                record.key_id, record.key_name = call.key.id, call.key.name
                admission = await self._limiter.acquire(call.key)
        except InhouseError as exc:
            record.status, record.error_code = exc.status, exc.code.value
            if not await self._write(call):
                exc = _audit_down()
            await error_response(exc)(scope, receive, send)
            return
        exchange = _Exchange(self, call, admission, scope, send)
        try:
            await self.app(scope, receive, exchange.send)
        except Exception:
            record.status, record.error_code = 500, ErrorCode.INTERNAL.value
            raise
        finally:
            if not exchange.audited:  # the client left mid-answer, or the app failed: audit what happened
                record.status = record.status or 499
                record.error_code = record.error_code or "client_disconnected"
                await self._write(call)
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

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self._call.record.status = message["status"]
            headers = list(message.get("headers", []))
            headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self._headers.items()]
            message = {**message, "headers": headers}
            content_type = next((v for k, v in headers if k.lower() == b"content-type"), b"")
            self._streaming = content_type.startswith(b"text/event-stream")
            if self._streaming:
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
        await self._send(self._start)
        await self._send({"type": "http.response.body", "body": body, "more_body": False})


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
