"""Raw-HTTP helpers for end-to-end tests: exact SSE framing, parsed events."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.process import ADMIN_KEY, ServerProcess


@dataclass
class SSEResult:
    status: int
    headers: httpx.Headers
    raw: bytes
    events: list[Any] = field(default_factory=list)  # parsed JSON payloads, in order
    comments: int = 0
    done: bool = False

    @property
    def text(self) -> str:
        out = []
        for e in self.events:
            for c in e.get("choices", []):
                out.append(c.get("delta", {}).get("content") or c.get("text") or "")
        return "".join(out)

    @property
    def finish_reasons(self) -> list[str]:
        return [c["finish_reason"] for e in self.events for c in e.get("choices", []) if c.get("finish_reason")]

    @property
    def usage(self) -> dict[str, int] | None:
        found = [e["usage"] for e in self.events if e.get("usage")]
        return found[-1] if found else None


def parse_sse(raw: bytes) -> tuple[list[Any], int, bool]:
    """Split exactly on blank lines as Dify does; every block is one `data:` line or one comment."""
    assert b"\r" not in raw, "SSE must be framed with \\n\\n, never \\r\\n"
    assert raw.endswith(b"\n\n"), "stream must end with a complete event"
    events, comments, done = [], 0, False
    for block in raw.split(b"\n\n")[:-1]:
        assert b"\n" not in block, f"one line per event, got {block!r}"
        if block.startswith(b":"):
            comments += 1
            continue
        assert block.startswith(b"data: "), f"only data lines, got {block!r}"
        payload = block[len(b"data: "):]
        assert not done, "nothing may follow [DONE]"
        if payload == b"[DONE]":
            done = True
            continue
        events.append(json.loads(payload))
    return events, comments, done


def stream(client: httpx.Client, path: str, body: dict[str, Any]) -> SSEResult:
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        raw = response.read()
    result = SSEResult(status=response.status_code, headers=response.headers, raw=raw)
    if response.status_code == 200:
        result.events, result.comments, result.done = parse_sse(raw)
    return result


def assert_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


@contextlib.contextmanager
def keyed_server(folder: Path, config: str, cache_dir: Path, log_path: Path) -> Iterator[ServerProcess]:
    """The real CLI with ``auth: keys`` (ADMIN_KEY the bootstrap admin) on ``config``, state under ``folder``."""
    (folder / "inhouse.yaml").write_text(config, encoding="utf-8")
    with ServerProcess(["--config", str(folder / "inhouse.yaml")], cache_dir, log_path, auth=True,
                       state_dir=folder / "state") as server:
        yield server


@contextlib.contextmanager
def admin_client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as c:
        yield c


def new_key(admin: httpx.Client, **fields: object) -> dict[str, Any]:
    """A key made through the admin API (a fresh name unless ``name`` is given): its public fields and secret."""
    r = admin.post("/admin/keys", json={"name": f"app-{time.time_ns()}", **fields})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def audit_rows(admin: httpx.Client, model: str, key_id: str, deadline_s: float = 60.0) -> list[dict[str, Any]]:
    """The audit rows of key ``key_id``'s calls to ``model``, polled for: a row is written behind its answer."""
    deadline = time.monotonic() + deadline_s
    rows: list[dict[str, Any]] = []
    while not rows and time.monotonic() < deadline:
        found = admin.get("/admin/audit", params={"model": model, "limit": 1000}).json()["data"]
        rows = [r for r in found if r.get("key_id") == key_id]
        if not rows:
            time.sleep(0.2)
    return rows
