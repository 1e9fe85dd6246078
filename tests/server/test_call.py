"""The call-end event: a Call ends once, every sink sees the completed record, and a sink that cannot keep
the call makes ``end`` say so (the answer must not be acknowledged)."""

from __future__ import annotations

import logging

import pytest

from inhouse.audit.record import AuditRecord
from inhouse.engine.base import Usage
from inhouse.errors import ErrorCode
from inhouse.server.call import Call
from inhouse.server.sinks import AccessLogSink


class Recorder:
    """A sink that keeps what it saw, and says whether it kept it."""

    def __init__(self, keeps: bool = True) -> None:
        self.keeps = keeps
        self.seen: list[AuditRecord] = []

    async def __call__(self, record: AuditRecord) -> bool:
        self.seen.append(record)
        return self.keeps


def call(*sinks: Recorder | AccessLogSink) -> Call:
    return Call(AuditRecord(at=0.0, request_id="req-1", method="POST", path="/v1/chat/completions"), sinks)


async def test_a_call_ends_once_and_every_sink_sees_its_complete_record() -> None:
    first, second = Recorder(), Recorder()
    c = call(first, second)
    c.asked("chatcmpl-1", "m", stream=False)
    c.served("m", "m-a")
    c.prompt("hi", 3)
    c.output("Hello", 1)
    c.used(Usage(3, 5), "stop")
    assert await c.end(200) is True
    assert await c.end(499) is True  # already over: nothing changes, no sink is called again
    for sink in (first, second):
        assert len(sink.seen) == 1
        record = sink.seen[0]
        assert (record.status, record.model, record.deployment, record.finish_reason) == (200, "m", "m-a", "stop")
        assert (record.prompt_tokens, record.completion_tokens) == (3, 5) and record.ttft_ms is not None
    assert c.tokens == 8


async def test_a_sink_that_cannot_keep_the_call_makes_end_false_and_the_others_still_see_it() -> None:
    refusing, keeping = Recorder(keeps=False), Recorder()
    c = call(refusing, keeping)
    assert await c.end(200) is False
    assert len(keeping.seen) == 1


async def test_tokens_counted_as_they_come_survive_an_early_end() -> None:
    sink = Recorder()
    c = call(sink)
    c.prompt(None, 4)
    c.output("a", 1)
    c.output("b", 1)
    c.failed(ErrorCode.CLIENT_DISCONNECTED)
    await c.end(499)
    assert (sink.seen[0].prompt_tokens, sink.seen[0].completion_tokens) == (4, 2)
    assert sink.seen[0].error_code == "client_disconnected"


async def test_the_access_log_sink_writes_one_structured_line_per_call(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="inhouse.access")
    left, answered = call(AccessLogSink()), call(AccessLogSink())
    left.failed(ErrorCode.CLIENT_DISCONNECTED)
    await left.end(499)
    answered.served("m", "local")
    answered.output("hi", 1)
    await answered.end(200)
    records = [r for r in caplog.records if r.name == "inhouse.access"]
    assert [r.getMessage() for r in records] == ["client disconnected: POST /v1/chat/completions (req-1)",
                                                 "POST /v1/chat/completions 200"]
    fields = records[1].fields  # type: ignore[attr-defined]
    assert (fields["status"], fields["deployment"], fields["completion_tokens"]) == (200, "local", 1)
    assert fields["ttft_ms"] is not None and fields["latency_ms"] >= fields["ttft_ms"]
    assert records[0].fields["error_code"] == "client_disconnected"  # type: ignore[attr-defined]
