"""A JSON view of the per-model numbers ``/metrics`` already holds, for the web console.

Owns ``model_summary``: reads the ``Metrics`` object's own counters and histograms at call time (cumulative
since the server started, like the Prometheus series) and adds them up per public model name.  Keeps nothing
between calls: a rate is the difference of two reads divided by the time between them, which the caller
computes (the console polls; ``at`` is the server's clock).
"""

from __future__ import annotations

import time
from typing import Any

from inhouse.metrics.declared import Metrics

__all__ = ["model_summary"]


def _empty() -> dict[str, float]:
    return {"requests": 0, "errors": 0, "client_errors": 0, "prompt_tokens": 0, "completion_tokens": 0,
            "ttft_sum": 0.0, "ttft_count": 0, "latency_sum": 0.0, "latency_count": 0}


def model_summary(metrics: Metrics) -> dict[str, Any]:
    """``{"at": unix seconds, "models": {name: {requests, errors (5xx), client_errors (4xx), tokens, TTFT and
    latency sums and counts}}}``; calls refused before a model was known are not under any model."""
    models: dict[str, dict[str, float]] = {}

    def add(model: str, field: str, value: float) -> None:
        if model:
            entry = models.setdefault(model, _empty())
            entry[field] += value

    for family in metrics.requests.collect():
        for s in family.samples:
            if s.name.endswith("_total"):
                status = int(s.labels["status"]) if s.labels["status"].isdigit() else 0
                add(s.labels["model"], "requests", s.value)
                add(s.labels["model"], "errors" if status >= 500 else "client_errors", s.value if status >= 400 else 0)
    for counter, field in ((metrics.prompt_tokens, "prompt_tokens"), (metrics.completion_tokens,
                                                                       "completion_tokens")):
        for family in counter.collect():
            for s in family.samples:
                if s.name.endswith("_total"):
                    add(s.labels["model"], field, s.value)
    for histogram, prefix in ((metrics.ttft, "ttft"), (metrics.latency, "latency")):
        for family in histogram.collect():
            for s in family.samples:
                if s.name.endswith("_sum"):
                    add(s.labels["model"], prefix + "_sum", s.value)
                elif s.name.endswith("_count"):
                    add(s.labels["model"], prefix + "_count", s.value)
    return {"object": "metrics.models", "at": time.time(), "models": models}
