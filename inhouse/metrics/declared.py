"""Metrics: every ``inhouse_*`` metric recorded as things happen, on one registry that this object owns.

Owns the ``CollectorRegistry`` (built at the edge, passed down; never the process-wide default) and the
metrics fed by events: a call's end (``call_ended``, from the metrics sink), the router's retries, fallbacks
and circuits (``RouterEvents``), the audit writer's lag and failures.  What is read at scrape time (engine
load, deployment health, GPUs) is in ``live``.  Labels are the public model name, the deployment and the
route template: never a key secret, and the key *name* only when ``metrics.key_names`` is on.

Recording a call costs a few microseconds: the labelled children of a (model, deployment, key) are looked up
once and kept in ``_series`` (and ``_requests``, ``_queues``), so a call is a few dict lookups and a handful
of ``inc``/``observe``: about 5 us in all on a CI core (``bench/access.py`` measures it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.registry import Collector

from inhouse.audit.record import AuditRecord
from inhouse.config import MetricsSettings
from inhouse.errors import ErrorCode
from inhouse.gateway.registry import Deployment

__all__ = ["LATENCY_BUCKETS", "Metrics"]

# 5 ms … 300 s: a cached embedding, a first token, a long answer, a stuck upstream
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
                   300.0)
# gaps between tokens: well under a second when healthy
TOKEN_GAP_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                     30.0, 300.0)
_REJECTED = frozenset({ErrorCode.RATE_LIMITED.value, ErrorCode.QUOTA_EXCEEDED.value, ErrorCode.QUEUE_FULL.value})


@dataclass(frozen=True, slots=True)
class _Series:
    """The labelled children one (model, deployment[, key]) records into."""

    prompt: Any
    completion: Any
    latency: Any
    ttft: Any
    itl: Any


class Metrics:
    def __init__(self, settings: MetricsSettings | None = None, process: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.key_names = (settings or MetricsSettings()).key_names
        r = self.registry
        who = ("model", "deployment", "key") if self.key_names else ("model", "deployment")
        self.requests = Counter("inhouse_requests", "API calls by route template, HTTP status and error code",
                                ("route", "status", "code", *who), registry=r)
        self.prompt_tokens = Counter("inhouse_prompt_tokens", "prompt tokens of answered calls", who, registry=r)
        self.completion_tokens = Counter("inhouse_completion_tokens", "completion tokens generated", who,
                                         registry=r)
        self.latency = Histogram("inhouse_request_duration_seconds", "end-to-end call latency, from the "
                                 "request to the end of the answer", ("model", "deployment"),
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("inhouse_time_to_first_token_seconds", "time from the request to the first piece "
                              "of the answer", ("model", "deployment"), buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("inhouse_inter_token_latency_seconds", "a streamed answer's mean time per output "
                             "token after the first: (latency - TTFT) / (completion tokens - 1)",
                             ("model", "deployment"), buckets=TOKEN_GAP_BUCKETS, registry=r)
        self.queue = Histogram("inhouse_queue_seconds", "time from the router taking a call until a deployment "
                               "admitted it (waiting out failed tries and their backoff)", ("model",),
                               buckets=LATENCY_BUCKETS, registry=r)
        self.cancellations = Counter("inhouse_cancellations", "calls whose client left before the answer was "
                                     "complete (client_disconnected)", ("model", "deployment"), registry=r)
        self.rejections = Counter("inhouse_rejections", "429s by reason: rate_limit_exceeded (rpm, tpm, "
                                  "concurrency), insufficient_quota (token budget), queue_full (the engine)",
                                  ("reason", "model"), registry=r)
        self.retries = Counter("inhouse_retries", "retries before the first byte: the deployment and error of "
                               "the try that failed", ("model", "deployment", "code"), registry=r)
        self.fallbacks = Counter("inhouse_fallbacks", "calls answered by a fallback model after every "
                                 "deployment of the asked one failed", ("model", "fallback"), registry=r)
        self.circuit_opens = Counter("inhouse_circuit_opens", "times a deployment's circuit breaker opened",
                                     ("model", "deployment"), registry=r)
        self.audit_lag = Histogram("inhouse_audit_write_seconds", "audit lag: from a call's row handed to the "
                                   "writer until it is committed", buckets=LATENCY_BUCKETS, registry=r)
        self.audit_failures = Counter("inhouse_audit_write_failures", "audit rows that could not be committed "
                                      "(their calls were not acknowledged)", registry=r)
        if process:
            ProcessCollector(namespace="inhouse", registry=r)
        self._series: dict[tuple[str, ...], _Series] = {}
        self._requests: dict[tuple[str, ...], Any] = {}
        self._queues: dict[str, Any] = {}

    def expect(self, deployments: Iterable[Deployment]) -> None:
        """Start the event counters of these deployments at 0, so they are in every scrape before their
        first event (a rate() and an alert need the series to exist)."""
        for d in deployments:
            self.cancellations.labels(d.name, d.label)
            self.circuit_opens.labels(d.name, d.label)
            self.retries.labels(d.name, d.label, ErrorCode.UPSTREAM_UNAVAILABLE.value)
            for reason in sorted(_REJECTED):
                self.rejections.labels(reason, d.name)
            for fallback in d.spec.fallbacks:
                self.fallbacks.labels(d.name, fallback)

    def register(self, collector: Collector) -> None:
        """A collector read at scrape time (``LiveCollector``, ``GpuCollector``)."""
        self.registry.register(collector)

    def call_ended(self, record: AuditRecord, route: str, model: str) -> None:
        """One ended call: ``route`` its template, ``model`` a served model's public name (or "")."""
        deployment = record.deployment or ""
        who = (model, deployment, record.key_name or "") if self.key_names else (model, deployment)
        code = record.error_code or ""
        labels = (route, str(record.status), code, *who)
        counter = self._requests.get(labels)
        if counter is None:
            counter = self._requests[labels] = self.requests.labels(*labels)
        counter.inc()
        if code:
            if code == ErrorCode.CLIENT_DISCONNECTED.value:
                self.cancellations.labels(model, deployment).inc()
            elif code in _REJECTED:
                self.rejections.labels(code, model).inc()
        if not model:
            return  # refused before a model was known: counted above, nothing more to say
        series = self._series.get(who)
        if series is None:
            series = self._series[who] = self._new_series(who)
        if record.prompt_tokens:
            series.prompt.inc(record.prompt_tokens)
        completion = record.completion_tokens or 0
        if completion:
            series.completion.inc(completion)
        series.latency.observe(record.latency_ms / 1000)
        if record.ttft_ms is not None:
            series.ttft.observe(record.ttft_ms / 1000)
            if record.stream and completion > 1:
                series.itl.observe((record.latency_ms - record.ttft_ms) / 1000 / (completion - 1))

    def _new_series(self, who: tuple[str, ...]) -> _Series:
        pair = who[:2]
        return _Series(self.prompt_tokens.labels(*who), self.completion_tokens.labels(*who),
                       self.latency.labels(*pair), self.ttft.labels(*pair), self.itl.labels(*pair))

    # the router's events (``inhouse.gateway.router.RouterEvents``)
    def retried(self, model: str, deployment: str, code: ErrorCode) -> None:
        self.retries.labels(model, deployment, code.value).inc()

    def fell_back(self, model: str, fallback: str) -> None:
        self.fallbacks.labels(model, fallback).inc()

    def circuit_opened(self, model: str, deployment: str) -> None:
        self.circuit_opens.labels(model, deployment).inc()

    def admitted(self, model: str, waited_seconds: float) -> None:
        child = self._queues.get(model)
        if child is None:
            child = self._queues[model] = self.queue.labels(model)
        child.observe(waited_seconds)

    # the audit sink's
    def audit_written(self, seconds: float, ok: bool) -> None:
        if ok:
            self.audit_lag.observe(seconds)
        else:
            self.audit_failures.inc()
