"""Dify's own plugin SDK with an API key, and through the gateway to an upstream inhouse.

The rest of the Dify conformance suite (test_dify.py) runs with ``--auth none``; this proves that what
Dify sends for a key works, that Dify's empty-key form is refused cleanly, and that streaming and
blocking keep their exact shape when the answer comes from an upstream deployment.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import TINY
from tests.e2e.dify import Dify
from tests.process import ADMIN_KEY, ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def keyed_gateway(tiny_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path,
                  logs_dir: Path) -> Iterator[ServerProcess]:
    """A keyed inhouse whose model ``via-gateway`` is the tiny model on another inhouse (an upstream)."""
    folder = tmp_path_factory.mktemp("dify-gateway")
    (folder / "inhouse.yaml").write_text(f"""
models:
  - {{name: via-gateway, engine: upstream, base_url: "{tiny_server.url}/v1", upstream_model: {TINY}}}
""", encoding="utf-8")
    with ServerProcess(["--config", str(folder / "inhouse.yaml")], cache_dir, logs_dir / "dify-gateway.log",
                       auth=True, state_dir=folder / "state") as server:
        yield server


@pytest.fixture(scope="module")
def secret(keyed_gateway: ServerProcess) -> str:
    r = httpx.post(keyed_gateway.url + "/admin/keys", json={"name": "dify"}, timeout=10,
                   headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    return str(r.json()["secret"])


def test_dify_with_a_key_blocking_and_stream_through_the_gateway(dify: Dify, keyed_gateway: ServerProcess,
                                                                 secret: str) -> None:
    url = keyed_gateway.url + "/v1"
    blocking = dify.ok("blocking", url, "via-gateway", "--api-key", secret, "--max-tokens", "8")
    streamed = dify.ok("stream", url, "via-gateway", "--api-key", secret, "--max-tokens", "8")
    assert blocking["text"] and streamed["text"] == blocking["text"]
    assert streamed["usage"]["completion_tokens"] == blocking["usage"]["completion_tokens"] > 0
    assert all(w["status"] == 200 for w in blocking["wire"] + streamed["wire"])


def test_dify_without_a_key_gets_a_clean_401(dify: Dify, keyed_gateway: ServerProcess) -> None:
    result = dify.run("blocking", keyed_gateway.url + "/v1", "via-gateway")
    assert not result["ok"]
    assert [w["status"] for w in result["wire"]] == [401]
