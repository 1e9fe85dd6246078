"""The JSON view of per-model numbers: the same counters and histograms /metrics exposes, added up per model."""

from __future__ import annotations

import pytest

from inhouse.metrics import Metrics
from inhouse.metrics.summary import model_summary
from tests.metrics.test_declared import record


def test_calls_add_up_per_model_with_errors_split_by_class() -> None:
    metrics = Metrics(process=False)
    metrics.call_ended(record(), "/v1/chat/completions", "m")
    metrics.call_ended(record(deployment="d2", ttft_ms=300.0, latency_ms=1500.0), "/v1/chat/completions", "m")
    metrics.call_ended(record(status=503, error_code="upstream_unavailable", prompt_tokens=0, completion_tokens=0,
                              ttft_ms=None), "/v1/chat/completions", "m")
    metrics.call_ended(record(status=429, error_code="rate_limit_exceeded", prompt_tokens=0, completion_tokens=0,
                              ttft_ms=None), "/v1/chat/completions", "m")
    metrics.call_ended(record(model="other", served_model="other"), "/v1/chat/completions", "other")
    metrics.call_ended(record(status=401, error_code="invalid_api_key"), "/v1/models", "")  # no model known
    summary = model_summary(metrics)
    assert summary["object"] == "metrics.models" and summary["at"] > 0
    assert set(summary["models"]) == {"m", "other"}
    m = summary["models"]["m"]
    assert (m["requests"], m["errors"], m["client_errors"]) == (4, 1, 1)
    assert (m["prompt_tokens"], m["completion_tokens"]) == (14, 22)
    assert m["ttft_count"] == 2 and m["ttft_sum"] == pytest.approx(0.4)
    assert m["latency_count"] == 4 and m["latency_sum"] == pytest.approx(0.5 + 1.5 + 0.5 + 0.5)
    assert summary["models"]["other"]["requests"] == 1


def test_no_calls_is_no_models() -> None:
    assert model_summary(Metrics(process=False))["models"] == {}
