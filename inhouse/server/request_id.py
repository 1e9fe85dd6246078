"""Request ids: the client's ``X-Request-ID`` (when it is usable) and the id every log line of a call carries.

Owns the check of a client-sent id (1 to 64 printable ASCII characters, no spaces; anything else is ignored
and the server makes its own), the context variable that holds the current call's id while the server
handles it, and the logging filter that copies it onto each log record as ``request_id``.

How the ids relate: a call's id is the client's ``X-Request-ID`` when it sent a usable one; otherwise the
server's: the completion id of a chat or text completion (``chatcmpl-…``, ``cmpl-…``), the ``embd-…`` or
``rerank-…`` id of an embeddings or rerank call, else ``req-…``.  That one id is in the ``x-request-id``
response header, the audit row's ``request_id``, the access-log line and every log line emitted while the
call runs.  The completion id in the response body stays the server's own (``chatcmpl-…``) either way.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Protocol

__all__ = ["MAX_LENGTH", "RequestIdFilter", "bind", "client_request_id", "current", "unbind"]

MAX_LENGTH = 64  # the audit log's request_id column


class _HasId(Protocol):
    @property
    def request_id(self) -> str: ...


# what the current call is (its record): read at each log line, so an id the route settles later still shows
_CURRENT: contextvars.ContextVar[_HasId | None] = contextvars.ContextVar("inhouse_request", default=None)


def bind(holder: _HasId) -> contextvars.Token[_HasId | None]:
    """From now on, in this task (and tasks it starts), log lines carry ``holder.request_id``."""
    return _CURRENT.set(holder)


def unbind(token: contextvars.Token[_HasId | None]) -> None:
    _CURRENT.reset(token)


def current() -> str | None:
    holder = _CURRENT.get()
    return holder.request_id if holder is not None else None


def client_request_id(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The client's ``X-Request-ID`` if it is 1..64 printable ASCII characters without spaces, else None."""
    for name, value in headers:
        if name.lower() == b"x-request-id":
            if 0 < len(value) <= MAX_LENGTH and all(0x21 <= byte <= 0x7E for byte in value):
                return value.decode("ascii")
            return None
    return None


class RequestIdFilter(logging.Filter):
    """Sets ``record.request_id`` (None outside a call) on every record a handler emits."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current()
        return True

