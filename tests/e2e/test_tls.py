"""TLS and mTLS through the real CLI, with certificates made in a fixture (tests/tls_certs.py).

Two servers: the "fleet", an inhouse that requires client certificates (``--tls-client-ca``) and keys, standing
in for an mTLS-protected vLLM fleet; and a gateway serving HTTPS (no client certificates) whose upstream models
reach the fleet with ``ca_file`` / ``client_cert`` / ``client_key``, or without the client certificate.

Covers: the official ``openai`` SDK over HTTPS; a client that does not trust the CA refusing the server; the
fleet refusing, before any HTTP, a client without a certificate or with one no trusted CA signed; a client with
a certificate being served and its subject in the audit row (the chain still verifies); the gateway reaching the
fleet over mTLS (blocking and streaming) and its health checks using the same client; an upstream without the
client certificate failing as an OpenAI-shaped 503, never a traceback; and Dify's plugin SDK trusting the CA
through ``REQUESTS_CA_BUNDLE`` (and refusing the server without it).
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.dify import Dify
from tests.e2e.helpers import assert_error, new_key
from tests.process import ADMIN_KEY, REPO, ServerProcess
from tests.tls_certs import CLIENT_SUBJECT, GATEWAY_SUBJECT, Certs, make_certs

pytestmark = pytest.mark.slow

HI = [{"role": "user", "content": "hi"}]
FLEET_REPLY = "Hello from the fleet"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def fleet(certs: Certs, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path,
          logs_dir: Path) -> Iterator[ServerProcess]:
    """mTLS and keys: every client needs a certificate the test CA signed, and a key."""
    folder = tmp_path_factory.mktemp("fleet")
    (folder / "inhouse.yaml").write_text(f"""
tls_cert: {certs.server_cert}
tls_key: {certs.server_key}
models:
  - {{name: fleet-model, engine: fake, fake_reply: "{FLEET_REPLY}"}}
""", encoding="utf-8")
    args = ["--config", str(folder / "inhouse.yaml"), "--tls-client-ca", str(certs.ca)]
    with ServerProcess(args, cache_dir, logs_dir / "fleet.log", auth=True, state_dir=folder / "state",
                       tls=certs.client_context(certs.client_cert, certs.client_key)) as server:
        yield server


@pytest.fixture(scope="module")
def fleet_admin(fleet: ServerProcess, certs: Certs) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fleet.url, timeout=30, headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                      verify=certs.client_context(certs.client_cert, certs.client_key)) as client:
        yield client


@pytest.fixture(scope="module")
def gateway(fleet: ServerProcess, fleet_admin: httpx.Client, certs: Certs, tmp_path_factory: pytest.TempPathFactory,
            cache_dir: Path, logs_dir: Path) -> Iterator[ServerProcess]:
    """HTTPS without client certificates; its upstreams reach the fleet with and without a client certificate.
    The files are named relative to the config file, as an operator would."""
    folder = certs.ca.parent
    secret = new_key(fleet_admin, name="gateway")["secret"]
    base = fleet.url + "/v1"
    (folder / "gateway.yaml").write_text(f"""
routing: {{retries: 0, health_interval_seconds: 0.5, health_timeout_seconds: 5}}
models:
  - {{name: local, engine: fake, fake_reply: "Hello over HTTPS"}}
  - {{name: remote, engine: upstream, base_url: "{base}", upstream_model: fleet-model, api_key: "{secret}",
     ca_file: {certs.ca.name}, client_cert: {certs.gateway_cert.name}, client_key: {certs.gateway_key.name}}}
  - {{name: no-client-cert, engine: upstream, base_url: "{base}", upstream_model: fleet-model, api_key: "{secret}",
     ca_file: {certs.ca.name}}}
  - {{name: untrusted, engine: upstream, base_url: "{base}", upstream_model: fleet-model, api_key: "{secret}"}}
""", encoding="utf-8")
    args = ["--config", str(folder / "gateway.yaml"), "--tls-cert", str(certs.server_cert),
            "--tls-key", str(certs.server_key)]
    with ServerProcess(args, cache_dir, logs_dir / "tls-gateway.log", tls=certs.client_context()) as server:
        yield server


@pytest.mark.parametrize(("flags", "model", "fragment"), [
    (["--tls-cert", "server.pem", "--tls-key", "client.key"], "", "tls_cert / tls_key:"),
    (["--tls-cert", "server.pem", "--tls-key", "server.key", "--tls-client-ca", "missing.pem"], "",
     "tls_client_ca:"),
    (["--tls-key", "server.key"], "", "tls_key: Value error, needs tls_cert"),
    ([], "ca_file: missing.pem", "model 'up' (https://127.0.0.1:1/v1): ca_file:"),
    ([], "client_cert: client.pem, client_key: server.key", "client_cert / client_key:"),
])
def test_unusable_tls_files_stop_the_start_naming_the_key(certs: Certs, flags: list[str], model: str,
                                                          fragment: str) -> None:
    config = certs.ca.parent / "start.yaml"
    config.write_text(f"models: [{{name: up, engine: upstream, base_url: 'https://127.0.0.1:1/v1', {model}}}]\n",
                      encoding="utf-8")
    args = [str(certs.ca.parent / f) if f.endswith((".pem", ".key")) else f for f in flags]
    proc = subprocess.run([sys.executable, "-m", "inhouse", "serve", "--config", str(config), "--auth", "none",
                           "--state-dir", str(certs.ca.parent / "start-state"), *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert fragment in proc.stderr and "Traceback" not in proc.stderr


def test_the_openai_sdk_talks_https(gateway: ServerProcess, certs: Certs) -> None:
    assert gateway.url.startswith("https://")
    with httpx.Client(verify=certs.client_context()) as http:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", http_client=http, max_retries=0)
        answer = client.chat.completions.create(model="local", messages=HI)  # type: ignore[arg-type]
        assert answer.choices[0].message.content == "Hello over HTTPS"
        chunks = client.chat.completions.create(model="local", messages=HI, stream=True)  # type: ignore[arg-type]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello over HTTPS"


def test_a_client_that_does_not_trust_the_ca_refuses_the_server(gateway: ServerProcess) -> None:
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(gateway.url + "/health", timeout=10)  # the system's CAs only


def test_plain_http_to_an_https_port_gets_no_answer(gateway: ServerProcess) -> None:
    with pytest.raises(httpx.TransportError):
        httpx.get(gateway.url.replace("https://", "http://") + "/health", timeout=10)


def _audited_chats(fleet_admin: httpx.Client) -> int:
    rows = fleet_admin.get("/admin/audit", params={"limit": 10000}).json()["data"]
    return sum(r["path"] == "/v1/chat/completions" for r in rows)


def test_mtls_refuses_clients_without_a_trusted_certificate_before_any_http(
    fleet: ServerProcess, fleet_admin: httpx.Client, certs: Certs
) -> None:
    before = _audited_chats(fleet_admin)
    body = {"model": "fleet-model", "messages": HI}
    for context in (certs.client_context(), certs.client_context(certs.stranger_cert, certs.stranger_key)):
        with pytest.raises(httpx.TransportError):  # TLS 1.3: the server closes the connection unanswered
            httpx.post(fleet.url + "/v1/chat/completions", json=body, verify=context, timeout=10)
    # TLS 1.2 checks the client's certificate inside the handshake: the handshake itself fails
    tls12 = certs.client_context()
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", fleet.port), timeout=10) as raw, \
            pytest.raises(ssl.SSLError):
        tls12.wrap_socket(raw, server_hostname="127.0.0.1")
    with httpx.Client(verify=certs.client_context()) as http:
        client = openai.OpenAI(base_url=fleet.url + "/v1", api_key="unused", http_client=http, max_retries=0)
        with pytest.raises(openai.APIConnectionError):
            client.chat.completions.create(model="fleet-model", messages=HI)  # type: ignore[arg-type]
    assert _audited_chats(fleet_admin) == before  # no request reached the app: nothing to audit


def test_a_client_with_a_certificate_is_served_and_its_subject_is_audited(
    fleet: ServerProcess, fleet_admin: httpx.Client, certs: Certs
) -> None:
    key = new_key(fleet_admin)
    with httpx.Client(verify=certs.client_context(certs.client_cert, certs.client_key)) as http:
        client = openai.OpenAI(base_url=fleet.url + "/v1", api_key=key["secret"], http_client=http, max_retries=0)
        answer = client.chat.completions.create(model="fleet-model", messages=HI)  # type: ignore[arg-type]
        assert answer.choices[0].message.content == FLEET_REPLY
        assert_error(http.post(fleet.url + "/v1/chat/completions", json={"model": "fleet-model", "messages": HI}),
                     401, "invalid_api_key")  # a certificate is not a key: both are needed
    rows = fleet_admin.get("/admin/audit", params={"key": key["id"]}).json()["data"]
    assert [(r["status"], r["client_subject"]) for r in rows] == [(200, CLIENT_SUBJECT)]
    recent = fleet_admin.get("/admin/audit", params={"limit": 5}).json()["data"]
    refused = next(r for r in recent if r["path"] == "/v1/chat/completions")
    assert refused["status"] == 401 and refused["key_id"] is None and refused["client_subject"] == CLIENT_SUBJECT
    admin_rows = [r for r in recent if r["path"].startswith("/admin/")]
    assert admin_rows and {r["client_subject"] for r in admin_rows} == {CLIENT_SUBJECT}  # the admin's own calls
    assert fleet_admin.get("/admin/audit/verify").json()["ok"] is True


def test_the_gateway_reaches_an_upstream_behind_mtls(gateway: ServerProcess, fleet_admin: httpx.Client,
                                                     certs: Certs) -> None:
    with httpx.Client(base_url=gateway.url, verify=certs.client_context(), timeout=30) as http:
        r = http.post("/v1/chat/completions", json={"model": "remote", "messages": HI})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == FLEET_REPLY
        with http.stream("POST", "/v1/chat/completions", json={"model": "remote", "messages": HI,
                                                               "stream": True}) as streamed:
            raw = streamed.read().decode()
        assert streamed.status_code == 200 and raw.endswith("data: [DONE]\n\n") and "fleet" in raw
    rows = fleet_admin.get("/admin/audit", params={"key": "gateway"}).json()["data"]
    assert len(rows) >= 2 and {r["client_subject"] for r in rows} == {GATEWAY_SUBJECT}


def _health(http: httpx.Client, model: str) -> dict:  # type: ignore[type-arg]
    return http.get("/health").json()["models"][model]  # type: ignore[no-any-return]


def test_an_upstream_without_the_client_certificate_fails_cleanly(gateway: ServerProcess, certs: Certs) -> None:
    with httpx.Client(base_url=gateway.url, verify=certs.client_context(), timeout=30) as http:
        for model in ("no-client-cert", "untrusted"):
            r = http.post("/v1/chat/completions", json={"model": model, "messages": HI})
            assert_error(r, 503, "upstream_unavailable")
            streamed = http.post("/v1/chat/completions", json={"model": model, "messages": HI, "stream": True})
            assert_error(streamed, 503, "upstream_unavailable")
        # the health checks use each upstream's own TLS client: the mTLS one stays up, the others go down, saying why
        deadline = time.monotonic() + 60
        while "health_error" not in _health(http, "untrusted") or "health_error" not in _health(http, "no-client-cert"):
            assert time.monotonic() < deadline, http.get("/health").text
            time.sleep(0.2)
        assert "client certificate" in _health(http, "no-client-cert")["health_error"]
        assert "certificate was refused" in _health(http, "untrusted")["health_error"]
        remote = _health(http, "remote")
        assert remote["healthy"] is True and "health_error" not in remote
    assert "Traceback" not in gateway.log_path.read_text(errors="replace")


def test_dify_trusts_a_private_ca_through_requests_ca_bundle(dify: Dify, gateway: ServerProcess, certs: Certs,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """What docs/security.md tells a Dify operator: the plugin (``requests``, certifi) refuses the server until
    the plugin daemon's environment names the CA bundle."""
    refused = dify.run("blocking", gateway.url + "/v1", "local")
    assert not refused["ok"] and "CERTIFICATE_VERIFY_FAILED" in refused["error"]
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certs.ca))
    assert dify.ok("blocking", gateway.url + "/v1", "local")["text"] == "Hello over HTTPS"
