"""Reading the audit log: search (tail, filters, export) and ``verify`` of the hash chain.

Owns the read side only; nothing here writes.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from inhouse.audit.record import HASHED_FIELDS, row_hash
from inhouse.storage.database import Database
from inhouse.storage.schema import GENESIS, audit_head, audit_log

__all__ = ["COLUMNS", "Verification", "export", "search", "verify"]

COLUMNS = [*HASHED_FIELDS, "prev_hash", "row_hash"]


def status_range(text: str) -> tuple[int, int]:
    """An HTTP status filter, ``429`` or a class ``4xx``, as the range ``[low, high)``; ValueError says what
    is accepted."""
    text = text.strip().lower()
    if re.fullmatch(r"[1-5][0-9][0-9]", text):
        return int(text), int(text) + 1
    if re.fullmatch(r"[1-5]xx", text):
        low = int(text[0]) * 100
        return low, low + 100
    raise ValueError("status must be an HTTP status (429) or a class of them (2xx, 4xx, 5xx)")


def search(db: Database, *, since: float | None = None, until: float | None = None, key: str | None = None,
           model: str | None = None, status: tuple[int, int] | None = None, limit: int = 100,
           newest_first: bool = True, after_seq: int | None = None) -> list[dict[str, Any]]:
    """Rows matching the filters (``status``: a range from ``status_range``); ``after_seq``: only rows appended
    after that one (``export --follow``)."""
    query = select(audit_log)
    if status is not None:
        query = query.where((audit_log.c.status >= status[0]) & (audit_log.c.status < status[1]))
    if after_seq is not None:
        query = query.where(audit_log.c.seq > after_seq)
    if since is not None:
        query = query.where(audit_log.c.at >= since)
    if until is not None:
        query = query.where(audit_log.c.at < until)
    if key:
        query = query.where((audit_log.c.key_id == key) | (audit_log.c.key_name == key))
    if model:
        query = query.where((audit_log.c.model == model) | (audit_log.c.served_model == model))
    query = query.order_by(audit_log.c.seq.desc() if newest_first else audit_log.c.seq).limit(limit)
    with db.begin() as conn:
        return [_plain(row) for row in conn.execute(query)]


def export(rows: list[dict[str, Any]], fmt: str) -> Iterator[str]:
    if fmt == "jsonl":
        for row in rows:
            yield json.dumps(row, ensure_ascii=False) + "\n"
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    yield buffer.getvalue()


@dataclass(frozen=True)
class Verification:
    ok: bool
    rows: int
    problem: str | None = None


def verify(db: Database, chunk: int = 5000) -> Verification:
    """Walk the chain from the first row: an edited, deleted, inserted or truncated row is reported."""
    prev, expected_seq, count = GENESIS, 1, 0
    with db.begin() as conn:
        head_seq, head_hash = conn.execute(select(audit_head.c.seq, audit_head.c.row_hash)).one()
        last = 0
        while True:
            rows = conn.execute(select(audit_log).where(audit_log.c.seq > last)
                                .order_by(audit_log.c.seq).limit(chunk)).all()
            if not rows:
                break
            for row in rows:
                data = _plain(row)
                if data["seq"] != expected_seq:
                    return Verification(False, count, f"row {expected_seq} is missing (deleted); next is {data['seq']}")
                if data["prev_hash"] != prev:
                    return Verification(False, count, f"row {data['seq']} does not follow row {data['seq'] - 1}")
                if row_hash(prev, data) != data["row_hash"]:
                    return Verification(False, count, f"row {data['seq']} was modified after it was written")
                prev, expected_seq, count = data["row_hash"], expected_seq + 1, count + 1
            last = rows[-1].seq
    if count != head_seq or prev != head_hash:
        return Verification(False, count, f"the log ends at row {count} but {head_seq} rows were written "
                                          "(rows at the end were deleted)")
    return Verification(True, count)


def _plain(row: Any) -> dict[str, Any]:
    # column names are str subclasses (quoted_name); JSON encoders want plain str keys
    return {str(k): v for k, v in row._mapping.items()}
