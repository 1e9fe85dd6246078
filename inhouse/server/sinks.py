"""The sinks on the call-end event (``Call.end``): what happens to a call's record once it is over.

Owns the audit sink (the one that must keep the call: the answer is not acknowledged when the row cannot
be committed) and the access-log sink (one short line for the calls worth a line: a client that left).
Prometheus metrics and a structured access log plug in here as more sinks.
"""

from __future__ import annotations

import logging

from inhouse.audit.record import AuditRecord
from inhouse.audit.writer import AuditUnavailableError, AuditWriter
from inhouse.errors import ErrorCode, InhouseError
from inhouse.server.call import CallSink

__all__ = ["AccessLogSink", "AuditSink", "audit_unavailable", "sinks_for"]

log = logging.getLogger("inhouse.access")


class AuditSink:
    """Commits the call's row; False if it could not be (the call is then not acknowledged)."""

    def __init__(self, writer: AuditWriter) -> None:
        self._writer = writer

    async def __call__(self, record: AuditRecord) -> bool:
        try:
            await self._writer.write(record)
        except AuditUnavailableError:
            return False
        return True


class AccessLogSink:
    """One line for a client that went away before its answer was complete; nothing for the rest (yet)."""

    async def __call__(self, record: AuditRecord) -> bool:
        if record.error_code == ErrorCode.CLIENT_DISCONNECTED.value:
            log.info("client disconnected: %s %s (%s)", record.method, record.path, record.request_id)
        return True


def sinks_for(audit: AuditWriter | None) -> tuple[CallSink, ...]:
    return (AccessLogSink(),) if audit is None else (AuditSink(audit), AccessLogSink())


def audit_unavailable() -> InhouseError:
    return InhouseError(ErrorCode.AUDIT_UNAVAILABLE, "the call could not be recorded in the audit log; "
                        "it was not completed. Retry later.", retry_after=5)
