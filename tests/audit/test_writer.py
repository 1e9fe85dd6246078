"""The audit writer and the hash chain on real SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import text

from inhouse.audit.query import export, search, status_range, verify
from inhouse.audit.record import AuditRecord
from inhouse.audit.writer import AuditWriter, TextPolicy
from inhouse.storage.database import Database
from inhouse.storage.schema import MIGRATIONS


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    database.migrate()
    yield database
    database.close()


def record(i: int, **extra: object) -> AuditRecord:
    return AuditRecord(at=time.time(), request_id=f"req-{i}", method="POST", path="/v1/chat/completions",
                       status=200, latency_ms=1.5, key_id="key_a", key_name="app", model="m", served_model="m",
                       prompt_tokens=3, completion_tokens=4, stream=bool(i % 2), finish_reason="stop",
                       **extra)  # type: ignore[arg-type]


async def write_all(writer: AuditWriter, records: list[AuditRecord]) -> None:
    await asyncio.gather(*(writer.write(r) for r in records))


async def test_concurrent_writes_are_all_committed_in_batches_and_chained(db: Database) -> None:
    writer = AuditWriter(db)
    writer.start()
    try:
        await write_all(writer, [record(i) for i in range(300)])
    finally:
        writer.close()
    assert writer.rows_written == 300 and writer.batches < 300  # group commit batched them
    rows = search(db, limit=1000, newest_first=False)
    assert [r["seq"] for r in rows] == list(range(1, 301))
    assert {r["request_id"] for r in rows} == {f"req-{i}" for i in range(300)}
    assert verify(db).ok and verify(db).rows == 300


@pytest.mark.parametrize("tamper, problem", [
    ("UPDATE inhouse_audit_log SET completion_tokens = 1 WHERE seq = 5", "row 5 was modified"),
    ("DELETE FROM inhouse_audit_log WHERE seq = 7", "row 7 is missing"),
    ("DELETE FROM inhouse_audit_log WHERE seq = 10", "rows at the end were deleted"),
])
async def test_verify_detects_tampering(db: Database, tamper: str, problem: str) -> None:
    writer = AuditWriter(db)
    writer.start()
    await write_all(writer, [record(i) for i in range(10)])
    writer.close()
    assert verify(db).ok
    with db.begin() as conn:
        conn.execute(text(tamper))
    result = verify(db)
    assert not result.ok and problem in (result.problem or "")


async def test_text_policy_truncates_and_redacts(db: Database) -> None:
    policy = TextPolicy("truncate", 30, (r"(?<!\d)1[3-9]\d{9}(?!\d)", r"(?<!\d)\d{17}[\dXx](?![\dXx])"))
    writer = AuditWriter(db, policy)
    writer.start()
    await writer.write(record(0, prompt_text="我的手机号是13812345678，身份证11010519491231002X，请帮我查询",
                              response_text="好的"))
    writer.close()
    row = search(db)[0]
    assert "13812345678" not in row["prompt_text"] and "11010519491231002X" not in row["prompt_text"]
    assert row["prompt_text"].startswith("我的手机号是[REDACTED]") and len(row["prompt_text"]) == 30
    assert verify(db).ok


async def test_text_is_off_by_default_and_export_formats(db: Database) -> None:
    writer = AuditWriter(db)
    writer.start()
    await writer.write(record(1, prompt_text="secret question"))
    writer.close()
    rows = search(db)
    assert rows[0]["prompt_text"] is None
    jsonl = "".join(export(rows, "jsonl"))
    assert '"request_id": "req-1"' in jsonl
    csv_text = "".join(export(rows, "csv"))
    assert csv_text.splitlines()[0].startswith("seq,at,request_id") and "req-1" in csv_text


def _hash_before_client_subject(prev: str, row: dict[str, object]) -> str:
    """row_hash as it was before ``client_subject`` existed (schema 2), written out here on purpose."""
    import hashlib
    import json

    fields = ("seq", "at", "request_id", "method", "path", "status", "latency_ms", "key_id", "key_name", "client_ip",
              "model", "served_model", "deployment", "error_code", "prompt_tokens", "completion_tokens", "ttft_ms",
              "stream", "finish_reason", "prompt_text", "response_text")
    canonical = json.dumps({k: row.get(k) for k in fields}, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256((prev + "\n" + canonical).encode("utf-8")).hexdigest()


def test_a_row_without_a_client_subject_hashes_as_before_and_one_with_it_covers_it() -> None:
    from inhouse.audit.record import row_hash

    row = {**record(1).fields(), "seq": 7}
    assert row["client_subject"] is None
    assert row_hash("ab" * 32, row) == _hash_before_client_subject("ab" * 32, row)
    signed = {**row, "client_subject": "CN=dify-prod,O=Bank"}
    assert row_hash("ab" * 32, signed) != row_hash("ab" * 32, row)
    assert row_hash("ab" * 32, signed) != row_hash("ab" * 32, {**signed, "client_subject": "CN=other,O=Bank"})


async def test_a_log_written_before_client_subject_still_verifies_after_the_migration(database_url: str) -> None:
    """A schema-2 database (no client_subject column) with rows chained the old way: migrated, it verifies, and
    rows written after the migration (with a subject or without) extend the same chain."""
    db = Database(database_url)
    db.migrate()
    writer = AuditWriter(db)
    writer.start()
    try:
        await write_all(writer, [record(i) for i in range(3)])
    finally:
        writer.close()
    with db.begin() as conn:
        conn.execute(text("ALTER TABLE inhouse_audit_log DROP COLUMN client_subject"))
        conn.execute(text("UPDATE inhouse_schema_version SET version = 2"))
    db.close()
    old = Database(database_url)
    try:
        assert old.migrate() == len(MIGRATIONS)
        assert verify(old).ok and verify(old).rows == 3
        writer = AuditWriter(old)
        writer.start()
        try:
            await writer.write(record(3, client_subject="CN=dify-prod,O=Bank"))
            await writer.write(record(4))
        finally:
            writer.close()
        assert verify(old).ok and verify(old).rows == 5
        rows = search(old, limit=10, newest_first=False)
        assert [r["client_subject"] for r in rows] == [None, None, None, "CN=dify-prod,O=Bank", None]
        with old.begin() as conn:
            conn.execute(text("UPDATE inhouse_audit_log SET client_subject = 'CN=mallory' WHERE seq = 4"))
        assert not verify(old).ok and "row 4 was modified" in (verify(old).problem or "")
    finally:
        old.close()


async def test_search_after_a_seq_returns_only_later_rows_oldest_first(db: Database) -> None:
    """What ``audit export --follow`` polls with: rows appended after the last one it printed."""
    writer = AuditWriter(db)
    writer.start()
    try:
        await write_all(writer, [record(i) for i in range(3)])
        first = search(db, newest_first=False, limit=1000, after_seq=None)
        assert [r["seq"] for r in first] == [1, 2, 3]
        assert search(db, newest_first=False, limit=1000, after_seq=3) == []
        await writer.write(record(3))
        later = search(db, newest_first=False, limit=1000, after_seq=3)
        assert [(r["seq"], r["request_id"]) for r in later] == [(4, "req-3")]
        assert [r["seq"] for r in search(db, newest_first=False, limit=1, after_seq=1)] == [2]
    finally:
        writer.close()


async def test_search_by_status_code_or_class(db: Database) -> None:
    writer = AuditWriter(db)
    writer.start()
    try:
        statuses = [200, 429, 404, 500, 200, 503]
        for i, status in enumerate(statuses):  # one at a time: seq follows the list
            await writer.write(dataclasses.replace(record(i), status=status))
    finally:
        writer.close()

    def found(status: str) -> list[int]:
        return [r["status"] for r in search(db, status=status_range(status), newest_first=False)]

    assert found("4xx") == [429, 404]
    assert found("5XX") == [500, 503]
    assert found("200") == [200, 200]
    assert found("201") == []
    for bad in ("4x", "600", "abc", "2xx,5xx", ""):
        with pytest.raises(ValueError, match="HTTP status"):
            status_range(bad)
