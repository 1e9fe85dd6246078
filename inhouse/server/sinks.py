"""The sinks on the call-end event (``Call.end``): what happens to a call's record once it is over.

Owns the audit sink (the one that must keep the call: the answer is not acknowledged when the row cannot
be committed; it also times the write, the audit lag), the access-log sink (one structured line per call:
request id, key name, model, deployment, status, error code, latency, time to first token, tokens) and the
metrics sink (counts and latencies, labelled by the route template, never the raw path).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable

from inhouse.audit.record import AuditRecord
from inhouse.audit.writer import AuditUnavailableError, AuditWriter
from inhouse.errors import ErrorCode, InhouseError
from inhouse.metrics import Metrics
from inhouse.server.call import CallSink

__all__ = ["AccessLogSink", "AuditSink", "MetricsSink", "RouteTemplates", "audit_unavailable", "sinks_for"]

log = logging.getLogger("inhouse.access")


class AuditSink:
    """Commits the call's row; False if it could not be (the call is then not acknowledged)."""

    def __init__(self, writer: AuditWriter, metrics: Metrics | None = None) -> None:
        self._writer = writer
        self._metrics = metrics

    async def __call__(self, record: AuditRecord) -> bool:
        started = time.monotonic()
        try:
            await self._writer.write(record)
        except AuditUnavailableError:
            if self._metrics is not None:
                self._metrics.audit_written(time.monotonic() - started, ok=False)
            return False
        if self._metrics is not None:
            self._metrics.audit_written(time.monotonic() - started, ok=True)
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


class RouteTemplates:
    """A request path → the template of the route that serves it (``/v1/models/{model_id}``), or ``other``:
    a bounded label however many model names or key ids clients put in paths."""

    def __init__(self, templates: Iterable[str]) -> None:
        templates = list(dict.fromkeys(templates))
        self._exact = frozenset(t for t in templates if "{" not in t)
        self._patterns = [(re.compile("^" + re.sub(r"\{(\w+)(:path)?\}",
                                                  lambda m: ".+" if m.group(2) else "[^/]+", t) + "$"),
                           re.sub(r":\w+\}", "}", t)) for t in templates if "{" in t]

    def __call__(self, path: str) -> str:
        if path in self._exact:
            return path
        for pattern, template in self._patterns:
            if pattern.match(path):
                return template
        return "other"


class MetricsSink:
    """Counts the call and its tokens and observes its latencies; the model label only for served models."""

    def __init__(self, metrics: Metrics, routes: RouteTemplates, served: Callable[[str], bool]) -> None:
        self._metrics, self._routes, self._served = metrics, routes, served

    async def __call__(self, record: AuditRecord) -> bool:
        model = record.served_model or record.model or ""
        if model and not record.served_model and not self._served(model):
            model = ""  # a name the client made up (404): not a label
        self._metrics.call_ended(record, self._routes(record.path), model)
        return True


def sinks_for(audit: AuditWriter | None, metrics: MetricsSink | None = None,
              audit_metrics: Metrics | None = None) -> tuple[CallSink, ...]:
    sinks: list[CallSink] = [] if audit is None else [AuditSink(audit, audit_metrics)]
    sinks.append(AccessLogSink())
    if metrics is not None:
        sinks.append(metrics)
    return tuple(sinks)


def audit_unavailable() -> InhouseError:
    return InhouseError(ErrorCode.AUDIT_UNAVAILABLE, "the call could not be recorded in the audit log; "
                        "it was not completed. Retry later.", retry_after=5)
