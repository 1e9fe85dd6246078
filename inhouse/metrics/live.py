"""The metrics read at scrape time: engine load, deployment standing, model state, the audit queue, GPUs.

Owns ``LiveCollector``, which walks the live model registry on every scrape (so a swapped or added model
shows at once, and nothing is kept between scrapes), and ``GpuCollector``, which reads NVIDIA devices
through ``nvidia-ml-py`` when it is installed and finds a GPU; without one its metrics are absent (not zero).
Holds no state besides the objects it reads.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from inhouse.audit.writer import AuditWriter
from inhouse.engine.base import Capability, EngineState
from inhouse.gateway.registry import ModelRegistry

__all__ = ["CIRCUIT_STATES", "GpuCollector", "LiveCollector"]

log = logging.getLogger("inhouse.metrics")

CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}
_ENCODING = frozenset({Capability.EMBEDDINGS, Capability.RERANK})
_DEPLOYMENT = ["model", "deployment"]


class LiveCollector(Collector):
    def __init__(self, registry: ModelRegistry, audit: AuditWriter | None = None) -> None:
        self._registry = registry
        self._audit = audit

    def collect(self) -> Iterator[Metric]:
        def gauge(name: str, doc: str, labels: list[str] = _DEPLOYMENT) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=labels)

        running = gauge("inhouse_engine_running_sequences", "sequences being decoded now (the decode batch)")
        waiting = gauge("inhouse_engine_waiting_sequences", "admitted sequences waiting for a batch slot")
        capacity = gauge("inhouse_engine_max_num_seqs", "the most sequences the engine decodes together")
        kv_usage = gauge("inhouse_engine_kv_cache_usage_ratio", "fraction of the KV-cache budget in use")
        kv_tokens = gauge("inhouse_engine_kv_cache_tokens", "tokens held in the KV cache")
        batches = CounterMetricFamily("inhouse_embedding_batches", "forward passes of a batching encoder "
                                      "(embeddings, rerank)", labels=_DEPLOYMENT)
        inputs = CounterMetricFamily("inhouse_embedding_batched_inputs", "inputs those forward passes carried "
                                     "(rate(inputs) / rate(batches) is the mean batch size)", labels=_DEPLOYMENT)
        max_batch = gauge("inhouse_embedding_max_batch_size", "the most inputs one forward pass carried")
        prefix_hits = CounterMetricFamily("inhouse_engine_prefix_cache_hit_tokens", "prompt tokens whose KV the "
                                          "prefix cache supplied (transformers engine)", labels=_DEPLOYMENT)
        prefix_misses = CounterMetricFamily("inhouse_engine_prefix_cache_miss_tokens", "prompt tokens looked up in "
                                            "the prefix cache and prefilled", labels=_DEPLOYMENT)
        prefix_evictions = CounterMetricFamily("inhouse_engine_prefix_cache_evictions", "prefix-cache blocks "
                                               "evicted to stay within its budget", labels=_DEPLOYMENT)
        prefix_bytes = gauge("inhouse_engine_prefix_cache_bytes", "memory the prefix cache holds")
        kv_bytes = gauge("inhouse_engine_kv_cache_bytes", "memory the KV cache of the running sequences holds "
                         "(transformers engine; the prefix cache apart)")
        kv_budget = gauge("inhouse_engine_kv_cache_budget_bytes", "the KV memory budget, prefix cache included "
                          "(transformers engine: kv_cache_gib)")
        healthy = gauge("inhouse_deployment_healthy", "1 when the health check passes (upstreams), else 0")
        circuit = gauge("inhouse_deployment_circuit_state", "circuit breaker: 0 closed, 1 half_open, 2 open")
        in_flight = gauge("inhouse_deployment_in_flight", "requests in flight on the deployment")
        state = gauge("inhouse_model_state", "1 for the deployment's engine state (loading, ready, failed, "
                      "closed), 0 for the others", [*_DEPLOYMENT, "state"])
        load = gauge("inhouse_model_load_seconds", "how long the deployment's engine took to load")
        for d in self._registry.all():
            labels = [d.name, d.label]
            stats = d.engine.stats()
            running.add_metric(labels, stats.running)
            waiting.add_metric(labels, stats.waiting)
            capacity.add_metric(labels, d.engine.info.max_num_seqs)
            kv_usage.add_metric(labels, stats.kv_cache_usage)
            kv_tokens.add_metric(labels, stats.kv_cache_tokens)
            if d.engine.info.capabilities & _ENCODING:
                batches.add_metric(labels, stats.batches)
                inputs.add_metric(labels, stats.batched_inputs)
                max_batch.add_metric(labels, stats.max_batch)
            if d.engine.info.kind in ("transformers", "vllm"):  # vLLM counts hits and misses, not its blocks
                prefix_hits.add_metric(labels, stats.prefix_cache_hit_tokens)
                prefix_misses.add_metric(labels, stats.prefix_cache_miss_tokens)
            if d.engine.info.kind == "transformers":
                prefix_evictions.add_metric(labels, stats.prefix_cache_evictions)
                prefix_bytes.add_metric(labels, stats.prefix_cache_bytes)
                kv_bytes.add_metric(labels, stats.kv_cache_bytes)
                kv_budget.add_metric(labels, stats.kv_cache_budget_bytes)
            healthy.add_metric(labels, 1 if d.route.healthy else 0)
            circuit.add_metric(labels, CIRCUIT_STATES.get(d.route.circuit, 2))
            in_flight.add_metric(labels, d.route.outstanding)
            for s in EngineState:
                state.add_metric([*labels, s.value], 1 if stats.state is s else 0)
            seconds = self._registry.load_seconds(d)
            if seconds is not None:
                load.add_metric(labels, seconds)
        yield from (running, waiting, capacity, kv_usage, kv_tokens, batches, inputs, max_batch, healthy, circuit,
                    in_flight, state, load, prefix_hits, prefix_misses, prefix_evictions, prefix_bytes, kv_bytes,
                    kv_budget)
        if self._audit is not None:
            yield CounterMetricFamily("inhouse_audit_rows_written", "audit rows committed",
                                      value=self._audit.rows_written)
            yield GaugeMetricFamily("inhouse_audit_queue_rows", "audit rows waiting for the writer",
                                    value=self._audit.queued())


class GpuCollector(Collector):
    """GPU memory and utilisation per device through NVML; nothing at all when there is no NVIDIA GPU."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._count = 0
        try:
            import pynvml  # nvidia-ml-py: optional

            pynvml.nvmlInit()
            self._count = pynvml.nvmlDeviceGetCount()
            self._nvml = pynvml
        except Exception:  # not installed, no driver, no device: the GPU metrics are absent
            self._nvml = None

    @property
    def present(self) -> bool:
        return self._nvml is not None and self._count > 0

    def collect(self) -> Iterator[Metric]:
        if not self.present:
            return
        nvml = self._nvml
        used = GaugeMetricFamily("inhouse_gpu_memory_used_bytes", "GPU memory in use", labels=["device"])
        total = GaugeMetricFamily("inhouse_gpu_memory_total_bytes", "GPU memory in all", labels=["device"])
        util = GaugeMetricFamily("inhouse_gpu_utilization_ratio", "fraction of the last sample period the GPU "
                                 "was busy", labels=["device"])
        for i in range(self._count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
            except Exception:
                log.debug("reading GPU %d failed", i, exc_info=True)
                continue
            used.add_metric([str(i)], memory.used)
            total.add_metric([str(i)], memory.total)
            util.add_metric([str(i)], rates.gpu / 100)
        yield from (used, total, util)
