"""LoRA adapters over an upstream base, through the real CLI: an adapter entry ``{base: remote, upstream_model:
support-v3}`` forwards its requests to the base's upstream asking for model ``support-v3`` (as a vLLM started with
``--lora-modules support-v3=/path`` serves it), while the base's own requests still ask for the base's model;
one is loaded and unloaded at runtime (``inhouse adapters load NAME --base remote --upstream-model ID``); a key
scoped to the adapter works, and the audit rows and metrics name the adapter.  The upstream is the fault upstream
(tests/fault_upstream.py), listing the adapters' ids, which records the ``model`` field of every request."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.e2e.helpers import assert_error, audit_rows, new_key
from tests.e2e.test_gateway import Upstream
from tests.process import ADMIN_KEY, REPO, ServerProcess

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
HI = [{"role": "user", "content": "hi"}]


class LoraUpstream(Upstream):
    """The fault upstream, listing the base model and two LoRA modules as a ``vllm serve --lora-modules`` would."""

    def start(self) -> LoraUpstream:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.fault_upstream", "--port", str(self.port), "--name", self.name,
                 "--model", "up-model", "--model", "support-v3", "--model", "legal-v1"],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(self.url + "/v1/models", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                assert time.monotonic() < deadline, f"upstream {self.name} did not start"
                time.sleep(0.1)


@pytest.fixture(scope="module")
def upstream(logs_dir: Path) -> Iterator[LoraUpstream]:
    up = LoraUpstream("lora-upstream", logs_dir).start()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def server(upstream: LoraUpstream, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path,
           logs_dir: Path) -> Iterator[ServerProcess]:
    models: list[dict[str, Any]] = [
        {"name": "remote", "engine": "upstream", "base_url": upstream.url + "/v1", "upstream_model": "up-model"},
        {"name": "support-bot", "base": "remote", "upstream_model": "support-v3"},
    ]
    config = tmp_path_factory.mktemp("upstream-lora") / "inhouse.yaml"
    config.write_text(yaml.safe_dump({"routing": {"health_interval_seconds": 0.5, "retries": 0}, "models": models}))
    with ServerProcess(["--config", str(config)], cache_dir, logs_dir / "upstream-lora.log", auth=True) as proc:
        yield proc


def cli(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "inhouse", "adapters", *args, "--url", server.url, "--key",
                           ADMIN_KEY], capture_output=True, text=True, timeout=120, cwd=REPO)


def chat(server: ServerProcess, model: str, headers: dict[str, str] = ADMIN) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", headers=headers, timeout=30,
                      json={"model": model, "messages": HI})


def test_the_adapter_asks_the_upstream_for_its_name_there(server: ServerProcess, upstream: LoraUpstream) -> None:
    r = chat(server, "support-bot")
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "support-bot", "clients see the public name"
    assert upstream.log()[-1]["model"] == "support-v3"
    base = chat(server, "remote")
    assert base.status_code == 200, base.text
    assert upstream.log()[-1]["model"] == "up-model"
    time.sleep(1.5)  # health checks ran: the upstream lists support-v3, so the adapter stays up
    health = httpx.get(server.url + "/health", timeout=10).json()["models"]["support-bot"]
    assert health["healthy"], health
    listed = cli(server, "list")
    assert listed.returncode == 0 and "support-bot\tbase=remote" in listed.stdout
    assert "upstream:support-v3" in listed.stdout


def test_runtime_load_and_unload_over_the_upstream(server: ServerProcess, upstream: LoraUpstream) -> None:
    loaded = cli(server, "load", "legal-bot", "--base", "remote", "--upstream-model", "legal-v1")
    assert loaded.returncode == 0, loaded.stderr
    r = chat(server, "legal-bot")
    assert r.status_code == 200, r.text
    assert upstream.log()[-1]["model"] == "legal-v1"
    with httpx.Client(base_url=server.url, headers=ADMIN, timeout=30) as admin:
        path = admin.post("/admin/adapters", json={"name": "x", "base": "remote", "path": "/adapters/x"})
        assert_error(path, 400, "invalid_request", param="upstream_model")
        listed = admin.get("/admin/adapters").json()["data"]
        assert {"name": "legal-bot", "base": "remote", "upstream_model": "legal-v1"}.items() <= next(
            a for a in listed if a["name"] == "legal-bot").items()
    unloaded = cli(server, "unload", "legal-bot")
    assert unloaded.returncode == 0, unloaded.stderr
    assert_error(chat(server, "legal-bot"), 404, "model_not_found")


def test_a_key_scoped_to_the_adapter_and_the_audit_and_metrics_name_it(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, headers=ADMIN, timeout=60) as admin:
        key = new_key(admin, models=["support-bot"])
        headers = {"Authorization": f"Bearer {key['secret']}"}
        ok = chat(server, "support-bot", headers)
        assert ok.status_code == 200, ok.text
        assert chat(server, "remote", headers).status_code in (403, 404)
        rows = audit_rows(admin, "support-bot", key["id"])
        assert rows and all(r["model"] == "support-bot" for r in rows)
        assert 'model="support-bot"' in admin.get("/metrics").text
