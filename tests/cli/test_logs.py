"""``setup_logging``: JSON lines (with the request id and structured fields) or readable text, one handler."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from inhouse.audit.record import AuditRecord
from inhouse.cli.logs import setup_logging
from inhouse.server.request_id import bind, unbind


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def emit(stream: io.StringIO, fmt: str) -> list[str]:
    setup_logging("info", fmt, stream)
    log = logging.getLogger("inhouse.test")
    log.info("outside any call")
    token = bind(AuditRecord(at=0.0, request_id="abc-123", method="POST", path="/v1/chat/completions"))
    try:
        log.info("POST %s %d", "/v1/chat/completions", 200, extra={"fields": {"status": 200, "model": "m",
                                                                              "ttft_ms": None}})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("it broke")
    finally:
        unbind(token)
    logging.getLogger("inhouse.test").debug("below the level")
    return stream.getvalue().splitlines()


@pytest.mark.usefixtures("restore_root")
def test_auto_writes_json_lines_off_a_terminal() -> None:
    lines = emit(io.StringIO(), "auto")
    parsed = [json.loads(line) for line in lines]  # every line is one JSON object, tracebacks included
    outside, access, failure = parsed
    assert outside["msg"] == "outside any call" and "request_id" not in outside
    assert outside["level"] == "info" and outside["logger"] == "inhouse.test" and outside["ts"].endswith("Z")
    assert access["msg"] == "POST /v1/chat/completions 200" and access["request_id"] == "abc-123"
    assert (access["status"], access["model"], access["ttft_ms"]) == (200, "m", None)
    assert failure["request_id"] == "abc-123" and "ValueError: boom" in failure["exc"]
    assert len(parsed) == 3


@pytest.mark.usefixtures("restore_root")
def test_auto_writes_text_on_a_terminal() -> None:
    lines = emit(Terminal(), "auto")
    assert lines[0].endswith("INFO inhouse.test: outside any call")
    assert lines[1].endswith("INFO inhouse.test: POST /v1/chat/completions 200 [abc-123] status=200 model=m")
    assert lines[2].endswith("ERROR inhouse.test: it broke [abc-123]")
    assert "ValueError: boom" in lines[-1]


@pytest.mark.usefixtures("restore_root")
def test_an_explicit_format_wins_over_the_terminal_check() -> None:
    assert json.loads(emit(Terminal(), "json")[0])["msg"] == "outside any call"
    assert not emit(io.StringIO(), "text")[0].startswith("{")
