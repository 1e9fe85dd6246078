"""The sinks on the call-end event (``Call.end``): what happens to a call's record once it is over.

Owns the audit sink (the one that must keep the call: the answer is not acknowledged when the row cannot
be committed) and the access-log sink (one structured line per call: request id, key name, model,
deployment, status, error code, latency, time to first token, tokens).  Prometheus metrics plug in here
as one more sink.
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
    """One structured line per call on logger ``inhouse.access``: its fields are keys of the JSON line (or
    ``key=value`` pairs on a terminal).  Errors at ``warning`` from 500 up, the rest at ``info``; a client that
    left says so in words."""

    async def __call__(self, record: AuditRecord) -> bool:
        fields = {name: getattr(record, name) for name in _ACCESS_FIELDS}
        fields["request_id"] = record.request_id
        if record.error_code == ErrorCode.CLIENT_DISCONNECTED.value:
            message = f"client disconnected: {record.method} {record.path} ({record.request_id})"
        else:
            message = f"{record.method} {record.path} {record.status}"
        log.log(logging.WARNING if record.status >= 500 else logging.INFO, message, extra={"fields": fields})
        return True


_ACCESS_FIELDS = ("method", "path", "status", "error_code", "key_name", "model", "served_model", "deployment",
                  "stream", "latency_ms", "ttft_ms", "prompt_tokens", "completion_tokens", "finish_reason",
                  "client_ip")


def sinks_for(audit: AuditWriter | None) -> tuple[CallSink, ...]:
    return (AccessLogSink(),) if audit is None else (AuditSink(audit), AccessLogSink())


def audit_unavailable() -> InhouseError:
    return InhouseError(ErrorCode.AUDIT_UNAVAILABLE, "the call could not be recorded in the audit log; "
                        "it was not completed. Retry later.", retry_after=5)
