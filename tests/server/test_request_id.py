"""The client's ``X-Request-ID``: which values are taken, and the id on log records while a call runs."""

from __future__ import annotations

import logging

import pytest

from inhouse.audit.record import AuditRecord
from inhouse.server.request_id import MAX_LENGTH, RequestIdFilter, bind, client_request_id, current, unbind


@pytest.mark.parametrize(("value", "taken"), [
    (b"abc-123", "abc-123"),
    (b"0f8e7a1c-2b3d-4e5f-8a9b-0c1d2e3f4a5b", "0f8e7a1c-2b3d-4e5f-8a9b-0c1d2e3f4a5b"),
    (b"x" * MAX_LENGTH, "x" * MAX_LENGTH),
    (b"x" * (MAX_LENGTH + 1), None),  # too long for the audit column: the server makes its own
    (b"", None),
    (b"has space", None),
    (b"tab\there", None),
    (b"new\nline", None),
    ("caf\u00e9".encode("latin-1"), None),  # not ASCII
])
def test_a_client_id_is_taken_only_when_short_and_printable(value: bytes, taken: str | None) -> None:
    assert client_request_id([(b"content-type", b"application/json"), (b"x-request-id", value)]) == taken


def test_the_header_name_is_case_insensitive_and_optional() -> None:
    assert client_request_id([(b"X-Request-ID", b"abc")]) == "abc"
    assert client_request_id([]) is None


def test_log_records_carry_the_bound_calls_current_id() -> None:
    record = AuditRecord(at=0.0, request_id="req-1", method="POST", path="/v1/chat/completions")
    log_filter = RequestIdFilter()

    def stamped() -> object:
        line = logging.LogRecord("inhouse.test", logging.INFO, __file__, 1, "hello", None, None)
        log_filter.filter(line)
        return line.request_id  # type: ignore[attr-defined]

    assert stamped() is None
    token = bind(record)
    try:
        assert stamped() == "req-1"
        record.request_id = "chatcmpl-9"  # the route settled the call's id: later lines carry it
        assert stamped() == current() == "chatcmpl-9"
    finally:
        unbind(token)
    assert stamped() is None
