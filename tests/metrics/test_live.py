"""LiveCollector reads engines and deployments at scrape time; GpuCollector is absent without a GPU."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from inhouse.metrics import GpuCollector, LiveCollector, Metrics
from tests.gateway.test_router import admit, deployment, gateway, spec


def scrape(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_engine_and_deployment_state_are_read_at_scrape_time(tmp_path: Path) -> None:
    _, registry = await gateway(tmp_path, [spec("m", "a"), spec("m", "b")])
    metrics = Metrics(process=False)
    metrics.register(LiveCollector(registry))
    a = (("deployment", "a"), ("model", "m"))
    before = scrape(metrics)
    assert before[("inhouse_deployment_in_flight", a)] == 0
    assert before[("inhouse_model_state", (*a, ("state", "ready")))] == 1
    assert before[("inhouse_model_state", (*a, ("state", "loading")))] == 0
    assert before[("inhouse_deployment_healthy", a)] == 1
    assert before[("inhouse_deployment_circuit_state", a)] == 0
    assert ("inhouse_engine_running_sequences", a) in before and ("inhouse_engine_kv_cache_usage_ratio", a) in before
    assert before[("inhouse_model_load_seconds", a)] >= 0
    assert not any(name.startswith("inhouse_embedding_") for name, _ in before)  # no encoder here
    deployment(registry, "a").route.outstanding += 3  # what the router counts in flight
    deployment(registry, "a").route.checked("health check failed")
    after = scrape(metrics)
    assert after[("inhouse_deployment_in_flight", a)] == 3
    assert after[("inhouse_deployment_healthy", a)] == 0
    deployment(registry, "a").route.outstanding -= 3
    await registry.close()


async def test_a_replaced_model_shows_at_the_next_scrape(tmp_path: Path) -> None:
    router, registry = await gateway(tmp_path, [spec("m"), spec("gone")])
    metrics = Metrics(process=False)
    metrics.register(LiveCollector(registry))
    assert any(dict(labels).get("model") == "gone" for _, labels in scrape(metrics))
    await registry.remove("gone", drain_seconds=0)
    assert not any(dict(labels).get("model") == "gone" for _, labels in scrape(metrics))
    (await admit(router, "m")).release()
    await registry.close()


def test_without_a_gpu_the_gpu_metrics_are_absent_not_zero() -> None:
    gpus = GpuCollector()
    assert not gpus.present  # this machine has no NVIDIA GPU (nor nvidia-ml-py)
    assert list(gpus.collect()) == []
    metrics = Metrics(process=False)
    metrics.register(gpus)
    assert "inhouse_gpu_" not in generate_latest(metrics.registry).decode()
