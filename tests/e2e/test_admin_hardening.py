"""The admin API refuses what it used to accept or widen (issue 8), through the real CLI with the fake engine.

Rotation keeps a deny-all key deny-all; query parameters and key bodies are validated strictly, each
refusal an OpenAI-shaped 400 naming its parameter; key names are unique among active keys, in the API and
in ``inhouse keys create``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.helpers import admin_client, assert_error, keyed_server
from tests.process import REPO, ServerProcess

CONFIG = """
key_cache_seconds: 0.5
models:
  - {name: echo, path: unused, engine: fake, fake_reply: "Hello there friend"}
  - {name: other, path: unused, engine: fake}
"""
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, logs_dir: Path) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("admin-hardening")
    with keyed_server(folder, CONFIG, cache_dir, logs_dir / "admin-hardening.log") as s:
        yield s


@pytest.fixture(scope="module")
def admin(server: ServerProcess) -> Iterator[httpx.Client]:
    with admin_client(server) as c:
        yield c


def unique(prefix: str) -> str:
    return f"{prefix}-{time.time_ns()}"


def chat(server: ServerProcess, secret: str, model: str) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", json={"model": model, "messages": HI},
                      headers={"Authorization": f"Bearer {secret}"}, timeout=30)


def test_a_rotated_deny_all_key_still_may_use_no_model(server: ServerProcess, admin: httpx.Client) -> None:
    created = admin.post("/admin/keys", json={"name": unique("deny"), "models": []})
    assert created.status_code == 201, created.text
    assert created.json()["models"] == []
    assert_error(chat(server, created.json()["secret"], "echo"), 403, "model_not_allowed")
    rotated = admin.post(f"/admin/keys/{created.json()['name']}/rotate")
    assert rotated.status_code == 201, rotated.text
    assert rotated.json()["models"] == []
    for model in ("echo", "other"):
        assert_error(chat(server, rotated.json()["secret"], model), 403, "model_not_allowed", param="model")


@pytest.mark.parametrize("value", ["nan", "inf", "1e400", "-5", "0", "10001", "abc", "1.5", " 5", "99999999999"])
def test_audit_limit_must_be_an_integer_in_range(admin: httpx.Client, value: str) -> None:
    error = assert_error(admin.get("/admin/audit", params={"limit": value}), 400, "invalid_request", param="limit")
    assert "1 to 10000" in error["message"]


@pytest.mark.parametrize("name", ["since", "until"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400", "soon"])
def test_audit_times_must_be_finite_numbers(admin: httpx.Client, name: str, value: str) -> None:
    error = assert_error(admin.get("/admin/audit", params={name: value}), 400, "invalid_request", param=name)
    assert "unix seconds" in error["message"]


def test_good_audit_parameters_work_and_unknown_ones_are_ignored(admin: httpx.Client) -> None:
    response = admin.get("/admin/audit", params={"limit": "10000", "since": "0", "until": f"{time.time() + 60}",
                                                 "colour": "blue"})
    assert response.status_code == 200, response.text
    assert len(admin.get("/admin/audit", params={"limit": "1"}).json()["data"]) == 1


def test_a_name_taken_by_an_active_key_is_refused(admin: httpx.Client) -> None:
    error = assert_error(admin.post("/admin/keys", json={"name": "admin"}), 400, "invalid_request", param="name")
    assert "taken by an active key" in error["message"]
    name = unique("svc")
    first = admin.post("/admin/keys", json={"name": name})
    assert first.status_code == 201
    assert_error(admin.post("/admin/keys", json={"name": name, "admin": True}), 400, "invalid_request", param="name")
    shaped = admin.post("/admin/keys", json={"name": first.json()["id"]})  # found by id first: it would stand for it
    assert "looks like a key id" in assert_error(shaped, 400, "invalid_request", param="name")["message"]
    rotated = admin.post(f"/admin/keys/{name}/rotate")  # keeps the name: the old key is revoked with it
    assert rotated.status_code == 201 and rotated.json()["name"] == name
    assert admin.get(f"/admin/keys/{first.json()['id']}").json()["status"] == "revoked"  # by id still works
    assert admin.post(f"/admin/keys/{name}/revoke").json()["id"] == rotated.json()["id"]
    again = admin.post("/admin/keys", json={"name": name})  # a name only revoked keys had is free
    assert again.status_code == 201, again.text
    assert admin.get(f"/admin/keys/{name}").json()["id"] == again.json()["id"]


@pytest.mark.parametrize(("fields", "param"), [
    ({"expires_at": "nan"}, "expires_at"),
    ({"expires_at": "inf"}, "expires_at"),
    ({"expires_at": 1.0}, "expires_at"),  # in the past
    ({"expires_at": True}, "expires_at"),
    ({"admin": "yes"}, "admin"),
    ({"admin": 1}, "admin"),
    ({"rpm": "5"}, "rpm"),
    ({"rpm": 5.5}, "rpm"),
    ({"tpm": True}, "tpm"),
    ({"max_concurrency": 0}, "max_concurrency"),
    ({"rpm": 2**40}, "rpm"),
    ({"token_budget": "100", "budget_period": "day"}, "token_budget"),
    ({"token_budget": 100, "budget_period": "week"}, "budget_period"),
    ({"models": "echo"}, "models"),
    ({"models": ["echo", ""]}, "models.1"),
    ({"models": ["echo", 5]}, "models.1"),
], ids=lambda v: str(v))
def test_key_bodies_are_strict(admin: httpx.Client, fields: dict[str, object], param: str) -> None:
    name = unique("strict")
    assert_error(admin.post("/admin/keys", json={"name": name, **fields}), 400, "invalid_request", param=param)
    assert_error(admin.get(f"/admin/keys/{name}"), 404, "not_found")  # nothing was created


def test_a_future_expiry_as_an_integer_is_accepted(admin: httpx.Client) -> None:
    expires = int(time.time()) + 3600
    created = admin.post("/admin/keys", json={"name": unique("later"), "expires_at": expires, "admin": False})
    assert created.status_code == 201, created.text
    assert created.json()["expires_at"] == expires and created.json()["status"] == "active"


def test_cli_refuses_a_taken_name_without_a_traceback(server: ServerProcess) -> None:
    taken = subprocess.run([sys.executable, "-m", "inhouse", "keys", "create", "--name", "admin",
                            "--state-dir", str(server.state_dir)], capture_output=True, text=True, timeout=60,
                           cwd=REPO)
    assert taken.returncode != 0 and "Traceback" not in taken.stderr
    assert "'admin' is taken by an active key" in taken.stderr and "ih-" not in taken.stdout
