"""Durability and replicas: the audit log survives SIGKILL under load; two servers share limits and keys.

Real processes only: inhouse servers from the CLI, a real PostgreSQL and a real Redis (tests/services.py).
"""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.helpers import assert_error
from tests.process import ADMIN_KEY, ServerProcess
from tests.services import PostgresServer, RedisServer

HI = [{"role": "user", "content": "hi"}]
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


def test_every_answer_a_client_received_is_in_the_audit_log_after_sigkill(
    tmp_path: Path, cache_dir: Path, logs_dir: Path
) -> None:
    config = tmp_path / "inhouse.yaml"
    config.write_text("models: [{name: echo, path: unused, engine: fake, fake_reply: 'one two three four',"
                      " fake_token_delay: 0.002}]\n", encoding="utf-8")
    server = ServerProcess(["--config", str(config)], cache_dir, logs_dir / "sigkill.log", auth=True,
                           state_dir=tmp_path / "state").start()
    received: list[str] = []
    stop = threading.Event()

    def client(streaming: bool) -> None:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as c:
            while not stop.is_set():
                body = {"model": "echo", "messages": HI, "stream": streaming}
                try:
                    if not streaming:
                        r = c.post("/v1/chat/completions", json=body)
                        if r.status_code == 200:
                            received.append(r.json()["id"])
                        continue
                    with c.stream("POST", "/v1/chat/completions", json=body) as r:
                        request_id, done = None, False
                        for line in r.iter_lines():
                            if line.startswith('data: {"id"') and request_id is None:
                                request_id = line.split('"')[3]
                            done = done or line == "data: [DONE]"
                        if done and request_id:
                            received.append(request_id)
                except httpx.HTTPError:
                    return  # the server was killed

    threads = [threading.Thread(target=client, args=(i % 2 == 0,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(3.0)
    assert server.proc is not None
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    stop.set()
    for t in threads:
        t.join(15)
    assert len(received) > 100, f"the load was too light to mean anything: {len(received)} answers"
    with sqlite3.connect(server.state_dir / "inhouse.db") as db:
        logged = {row[0] for row in db.execute("SELECT request_id FROM inhouse_audit_log")}
    missing = [r for r in received if r not in logged]
    assert missing == [], f"{len(missing)} of {len(received)} answered calls are not in the audit log"
    server.stop()


@pytest.fixture
def replicas(postgres: PostgresServer, redis_server: RedisServer, tmp_path: Path, cache_dir: Path,
             logs_dir: Path):  # type: ignore[no-untyped-def]
    url = postgres.create_database("replicas")
    config = tmp_path / "inhouse.yaml"
    config.write_text("models: [{name: echo, path: unused, engine: fake}]\n", encoding="utf-8")
    args = ["--config", str(config), "--database-url", url, "--redis-url", redis_server.url]
    a = ServerProcess(args, cache_dir, logs_dir / "replica-a.log", auth=True).start()
    b = ServerProcess(args, cache_dir, logs_dir / "replica-b.log", auth=True).start()
    yield a, b
    a.stop()
    b.stop()


def test_two_replicas_enforce_one_limit_and_one_revocation(replicas) -> None:  # type: ignore[no-untyped-def]
    a, b = replicas
    created = httpx.post(a.url + "/admin/keys", headers=AUTH, json={"name": "shared", "rpm": 4}, timeout=10)
    key = created.json()
    user = {"Authorization": f"Bearer {key['secret']}"}
    body = {"model": "echo", "messages": HI}
    answers = [httpx.post(s.url + "/v1/chat/completions", json=body, headers=user, timeout=10).status_code
               for s in (a, b, a, b)]
    assert answers == [200, 200, 200, 200]
    for s in (a, b):
        assert_error(httpx.post(s.url + "/v1/chat/completions", json=body, headers=user, timeout=10), 429,
                     "rate_limit_exceeded")
    # revoked on replica A; replica B's key cache (2 s) lets it through for at most that long
    other = httpx.post(a.url + "/admin/keys", headers=AUTH, json={"name": "victim"}, timeout=10).json()
    victim = {"Authorization": f"Bearer {other['secret']}"}
    assert httpx.post(b.url + "/v1/chat/completions", json=body, headers=victim, timeout=10).status_code == 200
    revoked_at = time.monotonic()
    httpx.post(a.url + f"/admin/keys/{other['id']}/revoke", headers=AUTH, timeout=10)
    while httpx.post(b.url + "/v1/chat/completions", json=body, headers=victim, timeout=10).status_code == 200:
        assert time.monotonic() - revoked_at < 5, "replica B still accepts a key revoked on replica A"
        time.sleep(0.1)
    verified = httpx.get(b.url + "/admin/audit/verify", headers=AUTH, timeout=30).json()
    assert verified["ok"] is True and verified["rows"] >= 8  # both replicas append to one chain
