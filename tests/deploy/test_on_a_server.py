"""The Kubernetes Deployment's own command line, with its ConfigMap, run for real against PostgreSQL and Redis.

The container's ``args`` from the rendered base (``$(VAR)``s filled in as Kubernetes would, from the test's
PostgreSQL, Redis and admin key), the ConfigMap's ``inhouse.yaml`` as the file: the embedded models load, the
probe routes answer, every metric the autoscaler and the adapter name is in the scrape, the image's
healthcheck script agrees with ``/ready``, and SIGTERM drains and exits 0 inside the grace period.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.test_k8s import OVERLAYS, adapter_rules, container, kustomize, one
from tests.process import ADMIN_KEY, REPO, ServerProcess, free_port
from tests.services import PostgresServer, RedisServer

pytestmark = pytest.mark.slow

HEALTHCHECK = REPO / "deploy" / "docker" / "healthcheck.py"


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return kustomize(OVERLAYS["base"])


@pytest.fixture(scope="module")
def server(docs: list[dict[str, Any]], postgres: PostgresServer, redis_server: RedisServer, cache_dir: Path,
           logs_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    c = container(docs)
    env = {"INHOUSE_DATABASE_URL": postgres.create_database("deploy_k8s"), "INHOUSE_REDIS_URL": redis_server.url,
           "INHOUSE_ADMIN_KEY": ADMIN_KEY}
    assert {e["name"] for e in c["env"]} == set(env)
    config = tmp_path_factory.mktemp("k8s") / "inhouse.yaml"
    config.write_text(one(docs, "ConfigMap", "inhouse-config")["data"]["inhouse.yaml"], encoding="utf-8")
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in c["args"]]
    assert args[0] == "serve"  # ServerProcess runs `inhouse serve`; the config path is the mount's, here a file
    args = [str(config) if a == "/etc/inhouse/inhouse.yaml" else a for a in args[1:]]
    # the config's host is 0.0.0.0 (the pod's address); a test binds loopback only
    with ServerProcess([*args, "--host", "127.0.0.1"], cache_dir, logs_dir / "deploy-k8s.log", ready_timeout=600,
                       auth=True, env=env) as s:
        yield s


def test_the_probe_routes_answer(server: ServerProcess) -> None:
    assert httpx.get(server.url + "/ready", timeout=30).json()["status"] == "ready"
    health = httpx.get(server.url + "/health", timeout=30).json()
    assert health["status"] == "ok"
    assert set(health["models"]) == {"smollm2-135m-instruct", "all-minilm-l6-v2"}


def test_state_is_in_postgres_not_sqlite(server: ServerProcess) -> None:
    assert not (server.state_dir / "inhouse.db").exists()
    created = httpx.post(server.url + "/admin/keys", json={"name": "dify"}, timeout=30,
                         headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert created.status_code in (200, 201), created.text
    assert not (server.state_dir / "inhouse.db").exists()


def test_every_metric_the_autoscaler_reads_is_scraped(server: ServerProcess, docs: list[dict[str, Any]]) -> None:
    chat = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    answer = httpx.post(server.url + "/v1/chat/completions", json=chat, timeout=120,
                        headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert answer.status_code == 200, answer.text
    scrape = httpx.get(server.url + "/metrics", timeout=30).text
    series = {(s.name, s.labels.get("model")) for f in text_string_to_metric_families(scrape) for s in f.samples}
    hpa = one(docs, "HorizontalPodAutoscaler", "inhouse")
    names = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    names |= {rule["seriesQuery"].split("{")[0] for rule in adapter_rules()}
    assert names
    for name in names:
        assert (name, "smollm2-135m-instruct") in series, name


def test_the_image_healthcheck_follows_ready(server: ServerProcess) -> None:
    def check(url: str) -> int:
        return subprocess.run([sys.executable, str(HEALTHCHECK)], env={**os.environ, "INHOUSE_HEALTHCHECK_URL": url},
                              capture_output=True, timeout=60).returncode

    assert check(server.url + "/ready") == 0
    assert check(f"http://127.0.0.1:{free_port()}/ready") == 1  # nothing listens
    assert check(server.url + "/no-such-route") == 1


def test_sigterm_drains_and_exits_0_inside_the_grace_period(server: ServerProcess,
                                                            docs: list[dict[str, Any]]) -> None:
    """Last in this module: it stops the server."""
    pod = one(docs, "Deployment", "inhouse")["spec"]["template"]["spec"]
    sleep = int(container(docs)["lifecycle"]["preStop"]["exec"]["command"][1])
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    code = server.proc.wait(timeout=pod["terminationGracePeriodSeconds"] - sleep)
    assert code == 0, server.log()
    assert "draining" in server.log()
    assert time.monotonic() - started < pod["terminationGracePeriodSeconds"] - sleep

