"""Prometheus metrics: every metric declared once (``declared``), the ones read at scrape time (``live``)."""

from inhouse.metrics.declared import LATENCY_BUCKETS, Metrics
from inhouse.metrics.live import GpuCollector, LiveCollector

__all__ = ["LATENCY_BUCKETS", "GpuCollector", "LiveCollector", "Metrics"]
