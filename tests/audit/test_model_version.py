"""The audit row's ``model_version``: hashed only when set, so rows written before the field existed still
verify; an old database gains the column by migration, and its old and new rows verify as one chain."""

from __future__ import annotations

import hashlib
import json
import time

from sqlalchemy import text

from inhouse.audit.query import search, verify
from inhouse.audit.record import HASHED_FIELDS, AuditRecord, row_hash
from inhouse.audit.writer import AuditWriter
from inhouse.storage.database import Database
from inhouse.storage.schema import schema_version


def _record(i: int, version: str | None) -> AuditRecord:
    return AuditRecord(at=time.time(), request_id=f"req-{i}", method="POST", path="/v1/chat/completions",
                       status=200, model="m", served_model="m", model_version=version)


def test_a_row_without_a_version_hashes_as_before_the_field_existed() -> None:
    row = {**_record(1, None).fields(), "seq": 1}
    old_fields = [f for f in HASHED_FIELDS if f not in ("client_subject", "model_version")]  # both added later
    before = json.dumps({k: row.get(k) for k in old_fields}, sort_keys=True, ensure_ascii=False,
                        separators=(",", ":"))
    expected = hashlib.sha256(("0" * 64 + "\n" + before).encode()).hexdigest()
    assert row_hash("0" * 64, row) == expected
    assert row_hash("0" * 64, {**row, "model_version": "v2"}) != expected  # once set, the version is hashed


async def test_an_old_database_is_migrated_and_old_and_new_rows_verify(database_url: str) -> None:
    db = Database(database_url)
    try:
        db.migrate()
        with db.begin() as conn:  # a database of the release before: no model_version column, schema 2
            conn.execute(text("ALTER TABLE inhouse_audit_log DROP COLUMN model_version"))
            conn.execute(schema_version.update().values(version=2))
            conn.execute(text("INSERT INTO inhouse_audit_log (seq, at, request_id, method, path, status, "
                              "latency_ms, stream, prev_hash, row_hash) VALUES (1, 1.0, 'old', 'POST', '/x', 200, "
                              "0, false, :prev, :hash)"),
                         {"prev": "0" * 64, "hash": _old_hash()})
            conn.execute(text("UPDATE inhouse_audit_head SET seq = 1, row_hash = :hash"), {"hash": _old_hash()})
        db.migrate()
        writer = AuditWriter(db)
        writer.start()
        try:
            for i, version in enumerate([None, "v-abc", "v-def"]):
                await writer.write(_record(i, version))
        finally:
            writer.close()
        result = verify(db)
        assert (result.ok, result.rows) == (True, 4), result.problem
        assert [r["model_version"] for r in search(db, newest_first=False)] == [None, None, "v-abc", "v-def"]
        with db.begin() as conn:  # a changed version is caught like any other edit
            conn.execute(text("UPDATE inhouse_audit_log SET model_version = 'v-evil' WHERE seq = 3"))
        assert not verify(db).ok
    finally:
        db.close()


def _old_hash() -> str:
    """The hash the release before wrote for the row inserted above (every field it knew, in its canonical form)."""
    row = {"seq": 1, "at": 1.0, "request_id": "old", "method": "POST", "path": "/x", "status": 200,
           "latency_ms": 0.0, "stream": False}
    fields = [f for f in HASHED_FIELDS if f not in ("client_subject", "model_version")]  # both added later
    canonical = json.dumps({k: row.get(k) for k in fields}, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(("0" * 64 + "\n" + canonical).encode()).hexdigest()
