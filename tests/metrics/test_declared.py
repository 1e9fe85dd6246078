"""Metrics: what one ended call records, the key-name label only when configured, and the router's events."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from inhouse.audit.record import AuditRecord
from inhouse.config import MetricsSettings, RoutingSettings
from inhouse.errors import ErrorCode, InhouseError
from inhouse.gateway.router import Router
from inhouse.metrics import Metrics
from tests.gateway.test_router import _Scripted, admit, always_down, gateway, scripted, spec, text_of


def record(**fields: object) -> AuditRecord:
    base: dict[str, object] = {"at": 0.0, "request_id": "r", "method": "POST", "path": "/v1/chat/completions",
                               "status": 200, "latency_ms": 500.0, "model": "m", "served_model": "m",
                               "deployment": "d1", "prompt_tokens": 7, "completion_tokens": 11, "ttft_ms": 100.0,
                               "stream": True, "key_id": "key_abc", "key_name": "team-a"}
    return AuditRecord(**{**base, **fields})  # type: ignore[arg-type]


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, by (sample name, sorted labels): what Prometheus would read."""
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, tuple(sorted(labels.items()))))


def test_a_call_counts_its_request_tokens_and_latencies() -> None:
    metrics = Metrics(process=False)
    metrics.call_ended(record(), "/v1/chat/completions", "m")
    metrics.call_ended(record(stream=False, completion_tokens=3), "/v1/chat/completions", "m")
    who = {"model": "m", "deployment": "d1"}
    assert value(metrics, "inhouse_requests_total", route="/v1/chat/completions", status="200", code="",
                 **who) == 2
    assert value(metrics, "inhouse_prompt_tokens_total", **who) == 14
    assert value(metrics, "inhouse_completion_tokens_total", **who) == 14
    assert value(metrics, "inhouse_request_duration_seconds_count", **who) == 2
    assert value(metrics, "inhouse_request_duration_seconds_sum", **who) == 1.0
    assert value(metrics, "inhouse_time_to_first_token_seconds_sum", **who) == 0.2
    # the streamed one only: (500 ms - 100 ms) / (11 - 1) tokens = 40 ms
    assert value(metrics, "inhouse_inter_token_latency_seconds_count", **who) == 1
    assert abs((value(metrics, "inhouse_inter_token_latency_seconds_sum", **who) or 0) - 0.04) < 1e-9
    assert value(metrics, "inhouse_request_duration_seconds_bucket", le="0.5", **who) == 2
    assert value(metrics, "inhouse_request_duration_seconds_bucket", le="0.25", **who) == 0


def test_no_key_label_unless_configured_and_never_a_secret() -> None:
    plain, named = Metrics(process=False), Metrics(MetricsSettings(key_names=True), process=False)
    for metrics in (plain, named):
        metrics.call_ended(record(), "/v1/chat/completions", "m")
    text = generate_latest(plain.registry).decode()
    assert "team-a" not in text and "key_abc" not in text and 'key="' not in text
    assert value(named, "inhouse_prompt_tokens_total", model="m", deployment="d1", key="team-a") == 7
    assert "key_abc" not in generate_latest(named.registry).decode()  # the name, never the id


def test_refusals_and_cancellations_by_reason() -> None:
    metrics = Metrics(process=False)
    metrics.call_ended(record(status=429, error_code="rate_limit_exceeded", deployment=None, served_model=None,
                              prompt_tokens=None, completion_tokens=None, ttft_ms=None), "/v1/chat/completions", "")
    metrics.call_ended(record(status=499, error_code=ErrorCode.CLIENT_DISCONNECTED.value), "/v1/chat/completions",
                       "m")
    assert value(metrics, "inhouse_rejections_total", reason="rate_limit_exceeded", model="") == 1
    assert value(metrics, "inhouse_cancellations_total", model="m", deployment="d1") == 1
    assert value(metrics, "inhouse_requests_total", route="/v1/chat/completions", status="429",
                 code="rate_limit_exceeded", model="", deployment="") == 1
    # a refusal before any model is known observes no latency for a model
    assert value(metrics, "inhouse_request_duration_seconds_count", model="", deployment="") is None


def test_audit_lag_and_failures() -> None:
    metrics = Metrics(process=False)
    metrics.audit_written(0.002, ok=True)
    metrics.audit_written(0.5, ok=False)
    assert value(metrics, "inhouse_audit_write_seconds_count") == 1
    assert value(metrics, "inhouse_audit_write_failures_total") == 1


def test_process_cpu_and_memory_are_there() -> None:
    names = {name for name, _ in samples(Metrics())}
    assert {"inhouse_process_cpu_seconds_total", "inhouse_process_resident_memory_bytes"} <= names


async def test_the_router_reports_retries_circuits_fallbacks_and_queue_time(tmp_path: Path) -> None:
    specs = [spec("main", "a", fallbacks=("backup",)), spec("backup")]
    _, registry = await gateway(tmp_path, specs, {"a": always_down()})
    metrics = Metrics(process=False)
    metrics.expect(registry.all())
    assert value(metrics, "inhouse_fallbacks_total", model="main", fallback="backup") == 0  # there before use
    router = Router(registry, RoutingSettings(retries=1, backoff_seconds=0, circuit_failures=2), metrics)
    routed = await admit(router, "main")
    assert routed.model == "backup"
    assert await text_of(routed.result[0])
    routed.release()
    # a fails twice: the second try is the one retry (after it the circuit opens and the fallback answers)
    assert value(metrics, "inhouse_retries_total", model="main", deployment="a", code="upstream_unavailable") == 1
    assert value(metrics, "inhouse_circuit_opens_total", model="main", deployment="a") == 1
    assert value(metrics, "inhouse_fallbacks_total", model="main", fallback="backup") == 1
    assert value(metrics, "inhouse_queue_seconds_count", model="backup") == 1
    await registry.close()


async def test_a_retry_on_another_deployment_is_counted_once_and_a_lone_full_engine_is_no_retry(
        tmp_path: Path) -> None:
    full = InhouseError(ErrorCode.QUEUE_FULL, "full")
    specs = [spec("main", "a"), spec("main", "b"), spec("alone")]
    _, registry = await gateway(tmp_path, specs, {"a": always_down(),
                                                  "alone": lambda s: _Scripted(s, [full], forever=True)})
    metrics = Metrics(process=False)
    metrics.expect(registry.all())
    router = Router(registry, RoutingSettings(retries=2, backoff_seconds=0, circuit_failures=100), metrics)
    for _ in range(100):  # the pick is random among idle deployments: call until a was tried first
        (await admit(router, "main")).release()
        if scripted(registry, "a").submits >= 2:
            break
    assert scripted(registry, "a").submits >= 2
    # every try of a failed and was retried on b
    assert value(metrics, "inhouse_retries_total", model="main", deployment="a",
                 code="upstream_unavailable") == scripted(registry, "a").submits
    with pytest.raises(InhouseError):
        await admit(router, "alone")
    assert value(metrics, "inhouse_retries_total", model="alone", deployment="alone", code="queue_full") is None
    assert value(metrics, "inhouse_retries_total", model="alone", deployment="alone",
                 code="upstream_unavailable") == 0
    await registry.close()
