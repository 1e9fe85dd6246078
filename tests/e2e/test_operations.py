"""Operations through the real CLI (fake engines): SIGTERM drain, request ids, JSON logs, probes, audit feed.

SIGTERM while several slow streams run: every stream completes with ``[DONE]``, a new call meanwhile gets 503
``server_draining`` with ``Retry-After`` and ``/ready`` is 503, the process exits 0 and the streams' audit
rows are in the database (read back with ``inhouse audit export``).  ``X-Request-ID`` goes round trip (header,
audit row, log line); every log line is JSON off a terminal; ``/health`` fails when an engine dies; and
``inhouse audit export --follow`` prints a row committed after it started, then stops on Ctrl-C.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.helpers import admin_client, assert_error, keyed_server, parse_sse
from tests.process import ADMIN_KEY, REPO, ServerProcess

pytestmark = pytest.mark.slow

SLOW_REPLY = "one two three four five six seven eight nine ten eleven twelve"
CONFIG = f"""
models:
  - {{name: echo, path: unused, engine: fake, fake_reply: "Hello there friend"}}
  - {{name: slow, path: unused, engine: fake, fake_reply: "{SLOW_REPLY}", fake_token_delay: 0.25}}
"""
HI = [{"role": "user", "content": "hi"}]
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
VECTOR = REPO / "deploy" / "vector" / "vector.toml"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, logs_dir: Path) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("operations")
    with keyed_server(folder, CONFIG, cache_dir, logs_dir / "operations.log") as s:
        yield s


def log_lines(server: ServerProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in server.log_path.read_text(errors="replace").splitlines() if line.strip()]


def wait_for(condition: Any, what: str, seconds: float = 30.0) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def audit_export(state_dir: Path, *args: str) -> list[dict[str, Any]]:
    done = subprocess.run([sys.executable, "-m", "inhouse", "audit", "export", "--state-dir", str(state_dir), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_a_client_request_id_goes_round_trip(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
        named = client.post("/v1/chat/completions", headers={"X-Request-ID": "trace-abc-123"},
                            json={"model": "echo", "messages": HI})
        assert named.status_code == 200 and named.headers["x-request-id"] == "trace-abc-123"
        assert named.json()["id"].startswith("chatcmpl-")  # the completion id stays the server's
        with client.stream("POST", "/v1/chat/completions", headers={"X-Request-ID": "trace-stream-7"},
                           json={"model": "echo", "messages": HI, "stream": True}) as streamed:
            assert streamed.headers["x-request-id"] == "trace-stream-7"
            assert parse_sse(streamed.read())[2]
        unnamed = client.post("/v1/chat/completions", json={"model": "echo", "messages": HI})
        assert unnamed.headers["x-request-id"] == unnamed.json()["id"]  # no client id: the completion's
        spaced = client.post("/v1/chat/completions", headers={"X-Request-ID": "has spaces in it"},
                             json={"model": "echo", "messages": HI})
        assert spaced.headers["x-request-id"] == spaced.json()["id"]  # unusable: ignored
        too_long = client.post("/v1/chat/completions", headers={"X-Request-ID": "x" * 65},
                               json={"model": "echo", "messages": HI})
        assert too_long.headers["x-request-id"] == too_long.json()["id"]
        public = client.get("/health", headers={"X-Request-ID": "probe-1"})
        assert public.headers["x-request-id"] == "probe-1"
        refused = client.post("/v1/chat/completions", headers={"X-Request-ID": "no-such-model-1"},
                              json={"model": "nope", "messages": HI})
        assert_error(refused, 404, "model_not_found")
        assert refused.headers["x-request-id"] == "no-such-model-1"

        rows = {r["request_id"]: r for r in client.get("/admin/audit", params={"limit": 50}).json()["data"]}
    assert rows["trace-abc-123"]["status"] == 200 and rows["trace-abc-123"]["model"] == "echo"
    assert rows["trace-stream-7"]["stream"] is True
    assert rows["no-such-model-1"]["error_code"] == "model_not_found"

    def access_line() -> dict[str, Any] | None:
        return next((line for line in log_lines(server) if line.get("request_id") == "trace-abc-123"
                     and line["logger"] == "inhouse.access"), None)

    line = wait_for(access_line, "the access line of trace-abc-123")
    assert line["msg"] == "POST /v1/chat/completions 200"
    assert (line["status"], line["model"], line["deployment"], line["key_name"]) == (200, "echo", "echo", "admin")
    assert line["completion_tokens"] == 3 and line["prompt_tokens"] > 0
    assert line["latency_ms"] >= line["ttft_ms"] > 0
    assert line["error_code"] is None


def test_every_log_line_is_json_with_levels_and_loggers(server: ServerProcess) -> None:
    lines = log_lines(server)  # json.loads of each line: any text line fails here
    assert len(lines) > 5
    assert all({"ts", "level", "logger", "msg"} <= line.keys() for line in lines)
    assert any(line["logger"] == "inhouse.registry" and "loaded" in line["msg"] for line in lines)
    assert any(line["logger"].startswith("uvicorn") for line in lines)


def test_the_server_sets_the_allocator_before_loading_models(server: ServerProcess) -> None:
    messages = [line["msg"] for line in log_lines(server)]
    said = next(i for i, m in enumerate(messages) if m.startswith("memory allocator: "))
    assert messages[said] == "memory allocator: blocks under 32 MiB from the heap, 128 MiB of free heap kept"
    assert said < next(i for i, m in enumerate(messages) if "loaded" in m)


def test_admin_models_shows_each_models_state(server: ServerProcess) -> None:
    with admin_client(server) as admin:
        body = admin.get("/admin/models").json()
        assert body["draining"] is False
        states = {m["id"]: (m["state"], [d["state"] for d in m["deployments"]]) for m in body["data"]}
        assert states == {"echo": ("ready", ["ready"]), "slow": ("ready", ["ready"])}
        assert admin.get("/v1/models/echo").json()["state"] == "ready"
        with httpx.Client(base_url=server.url) as anonymous:
            assert_error(anonymous.get("/admin/models"), 401, "invalid_api_key")


def vector_command(state_dir: Path) -> list[str]:
    """The command deploy/vector/vector.toml runs for the audit feed, on this server's state directory."""
    command = list(tomllib.loads(VECTOR.read_text(encoding="utf-8"))["sources"]["inhouse_audit"]["command"])
    assert command[:4] == ["inhouse", "audit", "export", "--follow"]
    command[command.index("--state-dir") + 1] = str(state_dir)
    return [sys.executable, "-m", "inhouse", *command[1:]]


def test_audit_export_follow_prints_rows_committed_after_it_started(server: ServerProcess) -> None:
    """The feed of deploy/vector/vector.toml: the rows there, then a row committed after it started."""
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
        assert client.post("/v1/chat/completions", json={"model": "echo", "messages": HI}).status_code == 200
        with subprocess.Popen(vector_command(server.state_dir), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) as follower:
            assert follower.stdout is not None and follower.stderr is not None
            out = follower.stdout
            lines: queue.Queue[str] = queue.Queue()
            reader = threading.Thread(target=lambda: [lines.put(line) for line in out], daemon=True)
            reader.start()
            try:
                json.loads(lines.get(timeout=30))  # the rows already there come first
                r = client.post("/v1/chat/completions", headers={"X-Request-ID": "followed-1"},
                                json={"model": "echo", "messages": HI})
                assert r.status_code == 200
                deadline = time.monotonic() + 30
                while True:
                    row = json.loads(lines.get(timeout=max(0.1, deadline - time.monotonic())))
                    if row["request_id"] == "followed-1":
                        break
                assert row["status"] == 200 and row["seq"] > 1 and row["row_hash"]
            finally:
                follower.send_signal(signal.SIGINT)
                code = follower.wait(30)
            reader.join(10)
            assert code == 0
            assert "Traceback" not in follower.stderr.read()


def test_sigterm_drains_streams_refuses_new_calls_and_exits_0(tmp_path: Path, cache_dir: Path,
                                                              logs_dir: Path) -> None:
    with keyed_server(tmp_path, CONFIG, cache_dir, logs_dir / "operations-drain.log") as server:
        assert server.proc is not None
        count = 4
        started = [threading.Event() for _ in range(count)]
        results: dict[int, tuple[int, bytes]] = {}

        def stream(i: int) -> None:
            with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client, \
                    client.stream("POST", "/v1/chat/completions", headers={"X-Request-ID": f"drain-{i}"},
                                  json={"model": "slow", "messages": HI, "stream": True}) as response:
                raw = b""
                for chunk in response.iter_bytes():
                    raw += chunk
                    started[i].set()
                results[i] = (response.status_code, raw)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(count)]
        for thread in threads:
            thread.start()
        for event in started:
            assert event.wait(30), "a stream never started"
        server.proc.send_signal(signal.SIGTERM)

        def refused() -> httpx.Response | None:
            r = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, timeout=30,
                           json={"model": "echo", "messages": HI})
            assert r.status_code in (200, 503), r.text
            return r if r.status_code == 503 else None

        late = wait_for(refused, "a 503 while draining")
        assert_error(late, 503, "server_draining")
        assert int(late.headers["retry-after"]) >= 1
        ready = httpx.get(server.url + "/ready", timeout=10)
        assert ready.status_code == 503 and ready.json()["status"] == "draining"

        for thread in threads:
            thread.join(60)
        assert server.proc.wait(60) == 0
        for i in range(count):
            status, raw = results[i]
            events, _, done = parse_sse(raw)
            assert status == 200 and done, raw[-200:]
            text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
            assert text == SLOW_REPLY

    rows = {r["request_id"]: r for r in audit_export(server.state_dir)}
    for i in range(count):
        row = rows[f"drain-{i}"]
        assert (row["status"], row["completion_tokens"], row["finish_reason"]) == (200, 12, "stop"), row
    assert any(r["error_code"] == "server_draining" and r["status"] == 503 for r in rows.values())
    messages = [line["msg"] for line in log_lines(server)]
    assert any(m.startswith("draining: refusing new requests") for m in messages)
    assert any(m.startswith("drained in") for m in messages)


def test_health_fails_when_an_engine_dies(tmp_path: Path, cache_dir: Path, logs_dir: Path) -> None:
    config = "models: [{name: mortal, path: unused, engine: fake, fake_die_after: 1}]\n"
    (tmp_path / "inhouse.yaml").write_text(config, encoding="utf-8")
    with ServerProcess(["--config", str(tmp_path / "inhouse.yaml")], cache_dir,
                       logs_dir / "operations-liveness.log") as server:
        assert httpx.get(server.url + "/health").json()["status"] == "ok"
        answered = httpx.post(server.url + "/v1/chat/completions", json={"model": "mortal", "messages": HI})
        assert answered.status_code == 200
        health = wait_for(lambda: (r := httpx.get(server.url + "/health")).status_code == 503 and r, "/health 503")
        assert health.json()["problems"] == ["the engine loop of mortal (mortal) died"]
        assert httpx.get(server.url + "/ready").status_code == 503
        assert httpx.get(server.url + "/admin/models").json()["data"][0]["state"] == "failed"  # auth off: open
