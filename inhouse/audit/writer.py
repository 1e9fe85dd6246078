"""AuditWriter: durable, batched, hash-chained writes of AuditRecords, off the event loop.

Owns the writer thread and its queue.  ``await write(record)`` returns only once the row is committed
(group commit: while one transaction commits, the records that arrive meanwhile wait and go into the
next one, so a busy server writes hundreds of rows per fsync and a quiet one writes each at once).
The server awaits it before the last byte of each answer, so a client never holds an answer whose row
is not in the database.  Prompt/response text is kept, truncated or dropped per config, after
redaction, here in the writer thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from inhouse.audit.record import AuditRecord, row_hash
from inhouse.storage.database import Database
from inhouse.storage.schema import audit_head, audit_log

__all__ = ["AuditUnavailableError", "AuditWriter", "TextPolicy"]

log = logging.getLogger("inhouse.audit")

_MAX_BATCH = 1000


class AuditUnavailableError(Exception):
    """The row could not be committed; the call must not be acknowledged."""


@dataclass(frozen=True)
class TextPolicy:
    mode: str = "off"  # off | truncate | full
    max_chars: int = 2000
    redact: tuple[str, ...] = ()  # regular expressions replaced by [REDACTED]

    def apply(self, text: str | None, patterns: Sequence[re.Pattern[str]]) -> str | None:
        if text is None or self.mode == "off":
            return None
        for pattern in patterns:
            text = pattern.sub("[REDACTED]", text)
        return text[: self.max_chars] if self.mode == "truncate" else text


@dataclass
class _Pending:
    record: AuditRecord
    future: asyncio.Future[None]
    loop: asyncio.AbstractEventLoop


class AuditWriter:
    def __init__(self, db: Database, policy: TextPolicy | None = None) -> None:
        self._db = db
        self._policy = policy or TextPolicy()
        self._patterns = [re.compile(p) for p in self._policy.redact]
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="inhouse-audit", daemon=True)
        self._started = False
        self._sqlite: Any = None  # the writer thread's own driver connection, for SQLite
        self.rows_written = 0
        self.batches = 0
        self._oldest = 0.0  # monotonic time the oldest row not yet committed was queued (0.0: none)

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    async def write(self, record: AuditRecord) -> None:
        """Returns when the row is committed; raises AuditUnavailableError if it could not be."""
        loop = asyncio.get_running_loop()
        pending = _Pending(record, loop.create_future(), loop)
        if not self._oldest:
            self._oldest = time.monotonic()
        self._queue.put(pending)
        await pending.future  # if the caller is cancelled the row is still written; nobody waits for it

    def queued(self) -> int:
        """Rows handed to the writer and not taken into a transaction yet (the audit backlog)."""
        return self._queue.qsize()

    def stalled_for(self) -> float:
        """Seconds the oldest row not yet committed has waited (0 when every row is committed).  A healthy
        writer commits within milliseconds; a large number means the database or the thread is stuck."""
        oldest = self._oldest
        return time.monotonic() - oldest if oldest else 0.0

    @property
    def alive(self) -> bool:
        """The writer thread runs (or was never started: nothing to write yet)."""
        return not self._started or self._thread.is_alive()

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        if self._started:
            self._queue.put(None)
            self._thread.join(30)
        if self._sqlite is not None:
            self._sqlite.close()
            self._sqlite = None

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < _MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            error: BaseException | None = None
            try:
                self._commit([p.record for p in batch])
            except Exception as exc:
                log.exception("audit write of %d rows failed", len(batch))
                error = AuditUnavailableError("the audit log could not be written")
                del exc
            # rows queued while this batch committed are the oldest now: their age is at most this commit's
            self._oldest = time.monotonic() if not self._queue.empty() else 0.0
            for pending in batch:
                pending.loop.call_soon_threadsafe(_settle, pending.future, error)

    def _commit(self, records: list[AuditRecord]) -> None:
        if self._db.dialect == "sqlite":
            self._commit_sqlite(records)
        else:
            self._commit_locked(records)
        self.rows_written += len(records)
        self.batches += 1

    def _chain(self, records: list[AuditRecord], seq: int, prev: str) -> tuple[list[dict[str, Any]], int, str]:
        rows = []
        for record in records:
            seq += 1
            row = record.fields()
            row["prompt_text"] = self._policy.apply(record.prompt_text, self._patterns)
            row["response_text"] = self._policy.apply(record.response_text, self._patterns)
            row["seq"] = seq
            row["prev_hash"] = prev
            row["row_hash"] = prev = row_hash(prev, row)
            rows.append(row)
        return rows, seq, prev

    def _commit_locked(self, records: list[AuditRecord]) -> None:
        """PostgreSQL: the head row is locked, so replicas append to one chain one batch at a time."""
        with self._db.begin() as conn:
            head = select(audit_head.c.seq, audit_head.c.row_hash).where(audit_head.c.id == 1).with_for_update()
            seq, prev = conn.execute(head).one()
            rows, seq, prev = self._chain(records, seq, prev)
            conn.execute(audit_log.insert(), rows)
            conn.execute(audit_head.update().where(audit_head.c.id == 1).values(seq=seq, row_hash=prev))

    def _commit_sqlite(self, records: list[AuditRecord]) -> None:
        """SQLite: the driver directly, one ``BEGIN IMMEDIATE`` (the write lock) per batch.

        A tenth of the cost of the same transaction through SQLAlchemy (about 40 us against 420 us), which
        is most of what auditing adds to a call at concurrency 1.
        """
        if self._sqlite is None:
            self._sqlite = self._db.engine.raw_connection()
        cursor = self._sqlite.cursor()
        try:
            cursor.execute("BEGIN IMMEDIATE")
            seq, prev = cursor.execute("SELECT seq, row_hash FROM inhouse_audit_head WHERE id = 1").fetchone()
            rows, seq, prev = self._chain(records, seq, prev)
            cursor.executemany(_SQLITE_INSERT, rows)
            cursor.execute("UPDATE inhouse_audit_head SET seq = ?, row_hash = ? WHERE id = 1", (seq, prev))
            cursor.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                cursor.execute("ROLLBACK")
            raise
        finally:
            cursor.close()


_SQLITE_INSERT = (f"INSERT INTO inhouse_audit_log ({', '.join(c.name for c in audit_log.columns)}) "
                  f"VALUES ({', '.join(':' + c.name for c in audit_log.columns)})")


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
