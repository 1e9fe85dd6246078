"""The access layer under a careless or hostile client (issue 8), through the real CLI with the fake engine.

Every response carries ``x-request-id`` matching its audit row (errors and public routes too); a client that
leaves while uploading, while a blocking answer is made, or mid-stream has one outcome (499
``client_disconnected``, one log line, no traceback); a token budget is never overshot by parallel requests,
because each reserves prompt + max_tokens before it runs; and a new bootstrap admin secret starts the server.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.e2e.helpers import admin_client, assert_error, keyed_server, new_key
from tests.process import ADMIN_KEY, ServerProcess

CONFIG = """
key_cache_seconds: 0.5
models:
  - {name: echo, path: unused, engine: fake, fake_reply: "Hello there friend"}
  - {name: slow, path: unused, engine: fake, fake_reply: "one two three four five six seven eight nine ten",
     fake_token_delay: 0.3}
"""
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, logs_dir: Path) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("access-hardening")
    with keyed_server(folder, CONFIG, cache_dir, logs_dir / "access-hardening.log") as s:
        yield s


@pytest.fixture(scope="module")
def admin(server: ServerProcess) -> Iterator[httpx.Client]:
    with admin_client(server) as c:
        yield c


def audit_rows(admin: httpx.Client, key_id: str, count: int) -> list[dict]:  # type: ignore[type-arg]
    """The key's audit rows, once ``count`` are there (a disconnect is audited when the server notices it)."""
    for _ in range(100):
        rows = admin.get("/admin/audit", params={"key": key_id}).json()["data"]
        if len(rows) >= count:
            return rows  # type: ignore[no-any-return]
        time.sleep(0.1)
    raise AssertionError(f"expected {count} audit rows for {key_id}, got {rows}")


def test_every_response_carries_the_request_id_of_its_audit_row(server: ServerProcess, admin: httpx.Client) -> None:
    key = new_key(admin)
    auth = {"Authorization": f"Bearer {key['secret']}"}
    with httpx.Client(base_url=server.url, headers=auth, timeout=30) as client:
        responses = [
            client.post("/v1/chat/completions", json={"model": "echo", "messages": HI}),
            client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}),
            client.post("/v1/chat/completions", json={"model": "nope", "messages": HI}),
            client.post("/v1/chat/completions", json={"model": "echo", "messages": HI, "top_k": 2**63}),
            client.get("/v1/chat/completions"),
            client.get("/v1/no-such-route"),
            client.post("/v1/chat/completions", content=b"x" * (9 * 1024 * 1024),
                        headers={"content-type": "application/json"}),
        ]
    assert [r.status_code for r in responses] == [200, 400, 404, 400, 405, 404, 413]
    unauthenticated = httpx.post(server.url + "/v1/chat/completions", json={"model": "echo", "messages": HI})
    assert_error(unauthenticated, 401, "invalid_api_key")
    for response in (*responses, unauthenticated, httpx.get(server.url + "/health"), httpx.get(server.url + "/ready")):
        assert response.headers.get("x-request-id"), (response.status_code, response.url)
    assert responses[0].headers["x-request-id"] == responses[0].json()["id"]
    rows = {r["request_id"]: r for r in audit_rows(admin, key["id"], len(responses))}
    for response in responses:
        row = rows[response.headers["x-request-id"]]
        assert row["status"] == response.status_code
    recent = admin.get("/admin/audit", params={"limit": 20}).json()["data"]
    assert unauthenticated.headers["x-request-id"] in {r["request_id"] for r in recent}


def test_a_client_that_leaves_early_has_one_outcome(server: ServerProcess, admin: httpx.Client) -> None:
    key = new_key(admin)
    headers = {"Authorization": f"Bearer {key['secret']}"}
    # 1. gone while the body is still uploading
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + key["secret"].encode() + b"\r\nContent-Length: 100000\r\n\r\n"
                     b'{"model": "slow", "messages": [')
        time.sleep(0.3)
    # 2. gone while a blocking answer is generated (3 s of tokens)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json={"model": "slow", "messages": HI},
                   headers=headers, timeout=0.8)
    # 3. gone mid-stream
    with httpx.Client(timeout=30) as client, client.stream(
            "POST", server.url + "/v1/chat/completions", headers=headers,
            json={"model": "slow", "messages": HI, "stream": True}) as response:
        assert response.status_code == 200
        next(response.iter_bytes())
    rows = audit_rows(admin, key["id"], 3)
    assert [(r["status"], r["error_code"]) for r in rows] == [(499, "client_disconnected")] * 3, rows
    time.sleep(0.3)
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "unhandled error" not in log
    for row in rows:
        assert sum(row["request_id"] in line and "client disconnected" in line for line in log.splitlines()) == 1


def test_a_token_budget_is_not_overshot_by_parallel_requests(server: ServerProcess, admin: httpx.Client) -> None:
    key = new_key(admin, token_budget=30, budget_period="day")

    def call(_: int) -> httpx.Response:  # 5 tokens of the slow model: 1.5 s, so all eight are in flight together
        return httpx.post(server.url + "/v1/chat/completions", timeout=30,
                          json={"model": "slow", "messages": HI, "max_tokens": 5},
                          headers={"Authorization": f"Bearer {key['secret']}"})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(call, range(8)))
    served = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    for r in refused:
        error = assert_error(r, 429, "insufficient_quota")
        assert int(r.headers["retry-after"]) >= 1 and error["type"] == "insufficient_quota"
    # each reserves 3 prompt + 5 max_tokens = 8 of 30 and uses all 8: all eight (64 tokens) can never run
    assert served and refused
    used = sum(r.json()["usage"]["total_tokens"] for r in served)
    assert used <= 30
    # the unused part of each reservation was given back: what is left still admits a request that fits
    while used + 8 <= 30:
        r = call(0)
        assert r.status_code == 200, r.text
        used += r.json()["usage"]["total_tokens"]
    assert_error(call(0), 429, "insufficient_quota")
    rows = audit_rows(admin, key["id"], 8)
    assert sum((r["prompt_tokens"] or 0) + (r["completion_tokens"] or 0) for r in rows if r["status"] == 200) <= 30


def test_a_new_bootstrap_admin_secret_starts_the_server(tmp_path: Path, cache_dir: Path, logs_dir: Path) -> None:
    args = ["--config", str(tmp_path / "inhouse.yaml")]
    (tmp_path / "inhouse.yaml").write_text(CONFIG, encoding="utf-8")
    state = tmp_path / "state"
    with ServerProcess(args, cache_dir, logs_dir / "admin-swap-1.log", auth=True, state_dir=state):
        pass
    second = "ih-another-admin-secret-0123456789abcdef"
    with ServerProcess(args, cache_dir, logs_dir / "admin-swap-2.log", auth=True, state_dir=state,
                       env={"INHOUSE_ADMIN_KEY": second}) as s:
        for secret in (ADMIN_KEY, second):
            r = httpx.get(s.url + "/admin/keys", headers={"Authorization": f"Bearer {secret}"})
            assert r.status_code == 200, r.text
