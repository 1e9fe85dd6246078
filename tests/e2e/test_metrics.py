"""``GET /metrics`` after real traffic, through the real CLI, parsed with prometheus_client's own parser.

One keyed server (``metrics_public: false``: a key is needed to scrape) with a fake chat model (and a
fallback for it) and a tiny embedding model.  Blocking and streaming chats through the openai SDK, an unknown
model (404), a key over its rpm (429) and an embeddings call; then the scrape: counters match the calls sent,
histograms have observations, labels are model and deployment (no key), no secret appears.  The deployment files are
checked here too: ``promtool`` on the scrape config and the alert rules, and every metric a Grafana panel
or an alert names is in the scrape.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.helpers import admin_client, assert_error, keyed_server, new_key
from tests.process import ADMIN_KEY, REPO, ServerProcess

HI = [{"role": "user", "content": "hi"}]
DEPLOY = REPO / "deploy"
LABELS = {"model", "deployment", "route", "status", "code", "reason", "fallback", "state", "le"}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, logs_dir: Path,
           tiny_embedder_dir: Path) -> Iterator[ServerProcess]:
    config = f"""
metrics_public: false
models:
  - {{name: echo, path: unused, engine: fake, fake_reply: "one two three four five", fake_token_delay: 0.005,
     fallbacks: [backup]}}
  - {{name: backup, path: unused, engine: fake}}
  - {{name: slow, path: unused, engine: fake, fake_token_delay: 0.05,
     fake_reply: "{' '.join(['word'] * 200)}"}}
  - {{name: emb, path: "{tiny_embedder_dir}", engine: sentence-transformers}}
"""
    with keyed_server(tmp_path_factory.mktemp("metrics"), config, cache_dir, logs_dir / "metrics.log") as s:
        yield s


@pytest.fixture(scope="module")
def traffic(server: ServerProcess) -> dict[str, Any]:
    """The calls, once: what was sent and what the answers said they used."""
    with admin_client(server) as admin:
        key, slow = new_key(admin), new_key(admin, rpm=1)
    completion_tokens = prompt_tokens = 0
    with openai.OpenAI(base_url=server.url + "/v1", api_key=key["secret"], max_retries=0) as sdk:
        for _ in range(3):
            answer = sdk.chat.completions.create(model="echo", messages=HI)  # type: ignore[arg-type]
            assert answer.usage is not None
            prompt_tokens += answer.usage.prompt_tokens
            completion_tokens += answer.usage.completion_tokens
        for _ in range(2):
            chunks = list(sdk.chat.completions.create(model="echo", messages=HI, stream=True,  # type: ignore[arg-type]
                                                      stream_options={"include_usage": True}))
            usage = chunks[-1].usage
            assert usage is not None and usage.completion_tokens > 1
            prompt_tokens += usage.prompt_tokens
            completion_tokens += usage.completion_tokens
        with pytest.raises(openai.NotFoundError):
            sdk.chat.completions.create(model="no-such-model", messages=HI)  # type: ignore[arg-type]
        assert len(sdk.embeddings.create(model="emb", input=["a", "b", "c"]).data) == 3
    headers = {"Authorization": f"Bearer {slow['secret']}"}
    body = {"model": "echo", "messages": HI}
    first = httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert first.status_code == 200
    prompt_tokens += first.json()["usage"]["prompt_tokens"]
    completion_tokens += first.json()["usage"]["completion_tokens"]
    assert_error(httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=30),
                 429, "rate_limit_exceeded")
    return {"secrets": [key["secret"], slow["secret"], ADMIN_KEY], "key": key["secret"],
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}


@pytest.fixture(scope="module")
def scrape(server: ServerProcess, traffic: dict[str, Any]) -> str:
    response = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {traffic['key']}"}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


@pytest.fixture(scope="module")
def samples(scrape: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(scrape) for s in family.samples}


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_scraping_needs_a_key_when_metrics_are_not_public(server: ServerProcess) -> None:
    assert_error(httpx.get(server.url + "/metrics", timeout=30), 401, "invalid_api_key")
    document = httpx.get(server.url + "/openapi.json", timeout=30).json()
    operation = document["paths"]["/metrics"]["get"]
    assert {"bearer": []} in operation["security"] and "401" in operation["responses"]


def test_counters_match_the_calls_sent(samples: Samples, traffic: dict[str, Any]) -> None:
    echo = {"model": "echo", "deployment": "echo"}
    assert get(samples, "inhouse_requests_total", route="/v1/chat/completions", status="200", code="", **echo) == 6
    assert get(samples, "inhouse_requests_total", route="/v1/chat/completions", status="404", code="model_not_found",
               model="", deployment="") == 1
    assert get(samples, "inhouse_requests_total", route="/v1/chat/completions", status="429",
               code="rate_limit_exceeded", model="", deployment="") == 1
    assert get(samples, "inhouse_rejections_total", reason="rate_limit_exceeded", model="") == 1
    assert get(samples, "inhouse_requests_total", route="/v1/embeddings", status="200", code="", model="emb",
               deployment="emb") == 1
    assert get(samples, "inhouse_prompt_tokens_total", **echo) == traffic["prompt_tokens"]
    assert get(samples, "inhouse_completion_tokens_total", **echo) == traffic["completion_tokens"]
    assert get(samples, "inhouse_cancellations_total", **echo) == 0
    assert get(samples, "inhouse_fallbacks_total", model="echo", fallback="backup") == 0
    assert get(samples, "inhouse_retries_total", code="upstream_unavailable", **echo) == 0


def test_histograms_have_observations(samples: Samples) -> None:
    echo = {"model": "echo", "deployment": "echo"}
    assert get(samples, "inhouse_request_duration_seconds_count", **echo) == 6
    assert get(samples, "inhouse_request_duration_seconds_sum", **echo) > 0
    assert get(samples, "inhouse_request_duration_seconds_bucket", le="+Inf", **echo) == 6
    assert get(samples, "inhouse_time_to_first_token_seconds_count", **echo) == 6
    assert get(samples, "inhouse_inter_token_latency_seconds_count", **echo) == 2  # the two streams
    assert get(samples, "inhouse_inter_token_latency_seconds_sum", **echo) > 0
    assert get(samples, "inhouse_queue_seconds_count", model="echo") == 6
    assert get(samples, "inhouse_audit_write_seconds_count") >= 9  # every call's row, scrapes included
    assert get(samples, "inhouse_audit_write_failures_total") == 0


def test_engines_deployments_and_the_process_are_read_at_scrape_time(samples: Samples) -> None:
    for model in ("echo", "emb"):
        labels = {"model": model, "deployment": model}
        assert get(samples, "inhouse_model_state", state="ready", **labels) == 1
        assert get(samples, "inhouse_deployment_healthy", **labels) == 1
        assert get(samples, "inhouse_deployment_circuit_state", **labels) == 0
        assert get(samples, "inhouse_deployment_in_flight", **labels) == 0
        assert get(samples, "inhouse_model_load_seconds", **labels) >= 0
        assert get(samples, "inhouse_engine_running_sequences", **labels) == 0
    assert get(samples, "inhouse_embedding_batches_total", model="emb", deployment="emb") >= 1
    assert get(samples, "inhouse_embedding_batched_inputs_total", model="emb", deployment="emb") >= 3
    assert get(samples, "inhouse_process_resident_memory_bytes") > 0
    assert get(samples, "inhouse_process_cpu_seconds_total") > 0
    assert not any(name.startswith("inhouse_gpu_") for name, _ in samples)  # no GPU here: absent, not zero


def test_labels_are_bounded_and_no_secret_appears(scrape: str, samples: Samples, traffic: dict[str, Any]) -> None:
    for secret in traffic["secrets"]:
        assert secret not in scrape and secret[:11] not in scrape
    assert "no-such-model" not in scrape
    for name, labels in samples:
        assert name.startswith("inhouse_"), name
        assert {k for k, _ in labels} <= LABELS, (name, labels)


def test_a_client_that_leaves_mid_stream_is_a_cancellation(server: ServerProcess, traffic: dict[str, Any]) -> None:
    headers = {"Authorization": f"Bearer {traffic['key']}"}
    body = {"model": "slow", "messages": HI, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=headers, timeout=30) as answer:
        assert answer.status_code == 200
        next(answer.iter_lines())  # the first event, then the client hangs up
    slow = (("deployment", "slow"), ("model", "slow"))
    deadline, seen = time.monotonic() + 60, None
    while time.monotonic() < deadline:
        text = httpx.get(server.url + "/metrics", headers=headers, timeout=30).text
        found = {(s.name, tuple(sorted(s.labels.items()))): s.value
                 for family in text_string_to_metric_families(text) for s in family.samples}
        seen = found.get(("inhouse_cancellations_total", slow))
        if seen == 1:
            break
        time.sleep(0.2)
    assert seen == 1
    assert get(found, "inhouse_requests_total", route="/v1/chat/completions", status="499",
               code="client_disconnected", model="slow", deployment="slow") == 1


def test_promtool_accepts_the_scrape_config_and_the_alert_rules() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed: run scripts/services.sh (make test does)"
    for args in (["check", "rules", str(DEPLOY / "prometheus/alerts.yml")],
                 ["check", "config", str(DEPLOY / "prometheus/prometheus.yml")]):
        result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout + result.stderr


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (every inhouse_* identifier; label names are not inhouse_*)."""
    return set(re.findall(r"\binhouse_[a-z0-9_]+", expr))


def test_every_dashboard_query_names_a_scraped_metric(samples: Samples) -> None:
    dashboard = json.loads((DEPLOY / "grafana/inhouse-dashboard.json").read_text(encoding="utf-8"))
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(exprs) >= 20
    scraped = {name for name, _ in samples}
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"a panel query names no inhouse metric: {expr}"
        assert names <= scraped, f"{sorted(names - scraped)} (in {expr!r}) are not in a scrape"


def test_every_alert_names_a_scraped_metric(samples: Samples) -> None:
    rules = (DEPLOY / "prometheus/alerts.yml").read_text(encoding="utf-8")
    exprs = re.findall(r"expr: \|?\n?((?:.*\n)+?)\s+(?:for|labels):", rules)
    names = set().union(*(metric_names(e) for e in exprs))
    assert {"inhouse_requests_total", "inhouse_time_to_first_token_seconds_bucket", "inhouse_deployment_healthy",
            "inhouse_audit_write_seconds_bucket"} <= names
    assert names <= {name for name, _ in samples}, sorted(names - {name for name, _ in samples})
