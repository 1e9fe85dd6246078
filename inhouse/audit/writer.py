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
import logging
import queue
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass

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
        self.rows_written = 0
        self.batches = 0

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    async def write(self, record: AuditRecord) -> None:
        """Returns when the row is committed; raises AuditUnavailableError if it could not be."""
        loop = asyncio.get_running_loop()
        pending = _Pending(record, loop.create_future(), loop)
        self._queue.put(pending)
        await asyncio.shield(pending.future)

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        if self._started:
            self._queue.put(None)
            self._thread.join(30)

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
            for pending in batch:
                pending.loop.call_soon_threadsafe(_settle, pending.future, error)

    def _commit(self, records: list[AuditRecord]) -> None:
        rows = []
        with self._db.begin() as conn:
            head = select(audit_head.c.seq, audit_head.c.row_hash).where(audit_head.c.id == 1)
            if self._db.dialect == "postgresql":
                head = head.with_for_update()  # replicas append to one chain, one batch at a time
            seq, prev = conn.execute(head).one()
            for record in records:
                seq += 1
                row = record.fields()
                row["prompt_text"] = self._policy.apply(record.prompt_text, self._patterns)
                row["response_text"] = self._policy.apply(record.response_text, self._patterns)
                row["seq"] = seq
                row["prev_hash"] = prev
                row["row_hash"] = prev = row_hash(prev, row)
                rows.append(row)
            conn.execute(audit_log.insert(), rows)
            conn.execute(audit_head.update().where(audit_head.c.id == 1).values(seq=seq, row_hash=prev))
        self.rows_written += len(rows)
        self.batches += 1


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
