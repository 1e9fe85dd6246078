"""Keys, limits and the audit log through the real CLI: ``auth: keys`` with the fake engine.

Covers 401/403/429 shapes, the admin API, scoped model lists, revocation reaching the server within the
key cache time, rate-limit headers, audit rows for every call (refused ones too), ``inhouse audit
verify`` catching an edited row, the CLI for keys, and that no secret is ever written to the log or
the database.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.helpers import admin_client, assert_error, keyed_server, new_key, stream
from tests.process import ADMIN_KEY, REPO, ServerProcess

CONFIG = """
key_cache_seconds: 0.5
models:
  - {name: echo, path: unused, engine: fake, fake_reply: "Hello there friend"}
  - {name: other, path: unused, engine: fake}
"""
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, logs_dir: Path) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("access")
    with keyed_server(folder, CONFIG, cache_dir, logs_dir / "access.log") as s:
        yield s


@pytest.fixture(scope="module")
def admin(server: ServerProcess) -> Iterator[httpx.Client]:
    with admin_client(server) as c:
        yield c


def keyed(server: ServerProcess, secret: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {secret}"}, timeout=30)


def chat(server: ServerProcess, secret: str | None, model: str = "echo", **headers: str) -> httpx.Response:
    h = dict(headers)
    if secret is not None:
        h["Authorization"] = f"Bearer {secret}"
    return httpx.post(server.url + "/v1/chat/completions", json={"model": model, "messages": HI}, headers=h,
                      timeout=30)


def test_no_key_empty_header_and_bad_key_are_401(server: ServerProcess) -> None:
    for response in (chat(server, None), chat(server, None, authorization=""),
                     chat(server, None, authorization="Bearer"), chat(server, None, **{"x-api-key": ""}),
                     chat(server, "ih-not-a-real-key-000000000000000000000")):
        error = assert_error(response, 401, "invalid_api_key")
        assert error["type"] == "authentication_error"
    assert "Bearer" in chat(server, None).json()["error"]["message"]
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # public
    assert httpx.get(server.url + "/ready").status_code == 200


def test_a_created_key_works_with_the_openai_sdk(server: ServerProcess, admin: httpx.Client) -> None:
    key = new_key(admin)
    assert key["secret"].startswith("ih-") and key["prefix"] == key["secret"][:11]
    with openai.OpenAI(base_url=server.url + "/v1", api_key=key["secret"], max_retries=0) as sdk:
        answer = sdk.chat.completions.create(model="echo", messages=HI)  # type: ignore[arg-type]
        assert answer.choices[0].message.content == "Hello there friend"
    with openai.OpenAI(base_url=server.url + "/v1", api_key="ih-wrong", max_retries=0) as wrong, \
            pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with keyed(server, key["secret"]) as client:
        streamed = stream(client, "/v1/chat/completions", {"model": "echo", "messages": HI})
    assert streamed.done and streamed.text == "Hello there friend"


def test_scoped_key_sees_and_uses_only_its_models(server: ServerProcess, admin: httpx.Client) -> None:
    key = new_key(admin, models=["echo"])
    headers = {"Authorization": f"Bearer {key['secret']}"}
    listed = httpx.get(server.url + "/v1/models", headers=headers).json()["data"]
    assert [m["id"] for m in listed] == ["echo"]
    assert chat(server, key["secret"]).status_code == 200
    error = assert_error(chat(server, key["secret"], model="other"), 403, "model_not_allowed")
    assert error["param"] == "model" and error["type"] == "permission_error"
    assert httpx.get(server.url + "/v1/models/other", headers=headers).status_code == 404


def test_admin_api_needs_an_admin_key(server: ServerProcess, admin: httpx.Client) -> None:
    key = new_key(admin)
    user = {"Authorization": f"Bearer {key['secret']}"}
    assert_error(httpx.get(server.url + "/admin/keys", headers=user), 403, "admin_required")
    assert_error(httpx.get(server.url + "/admin/audit", headers=user), 403, "admin_required")
    listed = admin.get("/admin/keys").json()["data"]
    assert key["id"] in {k["id"] for k in listed}
    assert all("secret" not in k and "secret_hash" not in k for k in listed)
    assert_error(admin.post("/admin/keys", json={"name": "x", "token_budget": 5}), 400, "invalid_request")
    assert_error(admin.get("/admin/keys/key_missing"), 404, "not_found")


def test_revoke_and_rotate_take_effect_within_the_cache_time(server: ServerProcess, admin: httpx.Client) -> None:
    key = new_key(admin)
    assert chat(server, key["secret"]).status_code == 200  # now cached as valid
    rotated = admin.post(f"/admin/keys/{key['id']}/rotate")
    assert rotated.status_code == 201
    fresh = rotated.json()["secret"]
    assert chat(server, fresh).status_code == 200
    time.sleep(0.7)  # key_cache_seconds is 0.5 here (2 s by default)
    error = assert_error(chat(server, key["secret"]), 401, "invalid_api_key")
    assert "revoked" in error["message"] and key["secret"] not in error["message"]
    assert admin.post(f"/admin/keys/{rotated.json()['id']}/revoke").json()["status"] == "revoked"
    time.sleep(0.7)
    assert chat(server, fresh).status_code == 401


def test_rate_limit_429_with_retry_after_and_headers(server: ServerProcess, admin: httpx.Client) -> None:
    key = new_key(admin, rpm=2, tpm=100000)
    first = chat(server, key["secret"])
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-limit-tokens"] == "100000"
    assert chat(server, key["secret"]).status_code == 200
    refused = chat(server, key["secret"])
    error = assert_error(refused, 429, "rate_limit_exceeded")
    assert error["type"] == "rate_limit_error"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"


def test_every_call_is_audited_with_its_key_model_and_usage(server: ServerProcess, admin: httpx.Client) -> None:
    key = new_key(admin)
    ok = chat(server, key["secret"])
    request_id = ok.json()["id"]
    with keyed(server, key["secret"]) as client:
        streamed = stream(client, "/v1/chat/completions", {"model": "echo", "messages": HI, "stream": True})
    chat(server, "ih-not-a-real-key-000000000000000000000")
    rows = admin.get("/admin/audit", params={"key": key["id"]}).json()["data"]
    by_id = {r["request_id"]: r for r in rows}
    row = by_id[request_id]
    assert row["key_name"] == key["name"] and row["status"] == 200 and row["model"] == "echo"
    assert row["served_model"] == "echo" and row["stream"] is False and row["finish_reason"] == "stop"
    usage = ok.json()["usage"]
    assert (row["prompt_tokens"], row["completion_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert row["completion_tokens"] == 3 and row["latency_ms"] > 0
    assert row["client_ip"] == "127.0.0.1" and row["prompt_text"] is None
    stream_row = by_id[streamed.events[0]["id"]]
    assert stream_row["stream"] is True and stream_row["completion_tokens"] == 3
    assert stream_row["ttft_ms"] is not None and stream_row["ttft_ms"] <= stream_row["latency_ms"]
    recent = admin.get("/admin/audit", params={"limit": 50}).json()["data"]
    assert any(r["status"] == 401 and r["error_code"] == "invalid_api_key" and r["key_id"] is None for r in recent)
    assert admin.get("/admin/audit/verify").json()["ok"] is True


def test_secrets_never_reach_the_log_or_the_database(server: ServerProcess, admin: httpx.Client) -> None:
    key = new_key(admin)
    chat(server, key["secret"])
    database = (server.state_dir / "inhouse.db").read_bytes()
    for secret in (key["secret"], ADMIN_KEY):
        assert secret.encode() not in database
        assert secret not in server.log_path.read_text(errors="replace")


def run_cli(*args: str, state_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "inhouse", *args, "--state-dir", str(state_dir)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def test_cli_keys_and_audit_verify_catches_an_edit(tmp_path: Path) -> None:
    state = tmp_path / "state"
    created = run_cli("keys", "create", "--name", "batch", "--models", "a,b", "--rpm", "10", "--json",
                      state_dir=state)
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert key["models"] == ["a", "b"] and key["rpm"] == 10 and key["secret"].startswith("ih-")
    listed = run_cli("keys", "list", state_dir=state)
    assert key["id"] in listed.stdout and key["secret"] not in listed.stdout
    assert run_cli("keys", "revoke", key["id"], state_dir=state).returncode == 0
    assert "revoked" in run_cli("keys", "show", "batch", state_dir=state).stdout
    assert run_cli("keys", "show", "nobody", state_dir=state).returncode == 1
    bad = run_cli("keys", "create", "--name", "x", "--token-budget", "5", state_dir=state)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_audit_cli_verifies_the_servers_log(server: ServerProcess, admin: httpx.Client) -> None:
    chat(server, ADMIN_KEY)
    verified = run_cli("audit", "verify", state_dir=server.state_dir)
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["ok"] is True
    tail = run_cli("audit", "tail", "--limit", "3", state_dir=server.state_dir)
    assert len(tail.stdout.splitlines()) == 3
    exported = run_cli("audit", "export", "--since", "1h", "--format", "csv", state_dir=server.state_dir)
    assert exported.stdout.startswith("seq,at,request_id")
    copy = server.state_dir.parent / "tampered.db"
    with sqlite3.connect(server.state_dir / "inhouse.db") as source, sqlite3.connect(copy) as target:
        source.backup(target)
        target.execute("UPDATE inhouse_audit_log SET latency_ms = latency_ms + 1 WHERE seq = 2")
    tampered = subprocess.run([sys.executable, "-m", "inhouse", "audit", "verify", "--database-url",
                               f"sqlite:///{copy}"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert tampered.returncode == 1 and "row 2 was modified" in tampered.stdout


def test_first_start_prints_an_admin_key_once(tmp_path: Path, cache_dir: Path) -> None:
    config = tmp_path / "inhouse.yaml"
    config.write_text("models: [{name: echo, path: unused, engine: fake}]\n", encoding="utf-8")
    secrets = []
    for run in range(2):
        log = tmp_path / f"run{run}.log"
        with ServerProcess(["--config", str(config)], cache_dir, log, auth=True, state_dir=tmp_path / "state",
                           env={"INHOUSE_ADMIN_KEY": ""}) as server:
            text = log.read_text(errors="replace")
            secrets += [line.strip() for line in text.splitlines() if line.strip().startswith("ih-")]
            if run == 0:
                assert len(secrets) == 1 and "shown only this once" in text
                listed = httpx.get(server.url + "/admin/keys", timeout=10,
                                   headers={"Authorization": f"Bearer {secrets[0]}"})
                assert listed.status_code == 200 and listed.json()["data"][0]["admin"] is True
    assert len(secrets) == 1, "the second start must not create or print another admin key"
