"""The whole app in process: ``create_app(settings, registry, access)`` over httpx's ASGI transport.

Routing, auth and error paths that need no model, and chat on FakeEngines with exact usage: the same
answers the e2e suite checks through the real CLI, in milliseconds.  The lifespan is run by the test
(httpx's transport does not), so models load and the audit writer runs as under uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette

from inhouse.audit.writer import AuditWriter
from inhouse.config import FakeSpec, RoutingSettings, Settings
from inhouse.engine.factory import build_engine
from inhouse.gateway.health import HealthMonitor
from inhouse.gateway.registry import ModelRegistry
from inhouse.gateway.router import Router
from inhouse.keys.store import KeyStore
from inhouse.server.access import AccessParts
from inhouse.server.app import create_app
from inhouse.storage.database import Database

REPLY = "one two three"  # the chat model's answer: three tokens
BACKUP_REPLY = "backup says hi"
HELLO = [{"role": "user", "content": "hello there"}]  # the fake engine counts words + 2 per message: 4 tokens
PROMPT_TOKENS = 4


def settings_for(tmp_path: Path, auth: str = "none", max_choices: int = 8) -> Settings:
    models = (
        FakeSpec(name="chat", fake_reply=REPLY),
        FakeSpec(name="other", fake_reply="other model"),
        FakeSpec(name="primary", fake_reply="primary", fallbacks=("backup",)),
        FakeSpec(name="backup", fake_reply=BACKUP_REPLY),
        FakeSpec(name="broken", fake_reply="a b c d", fake_fail_after=1),
    )
    return Settings(models=models, auth=auth, cache_dir=tmp_path, state_dir=tmp_path,  # type: ignore[arg-type]
                    max_choices=max_choices, routing=RoutingSettings(backoff_seconds=0))


@dataclass
class Server:
    client: httpx.AsyncClient
    registry: ModelRegistry


def build(settings: Settings, access: AccessParts | None = None) -> tuple[Starlette, ModelRegistry]:
    """The app from its parts, as ``inhouse serve`` builds it."""
    registry = ModelRegistry.of((spec, build_engine(spec, settings.cache_dir)) for spec in settings.models)
    router = Router(registry, settings.routing)
    return create_app(settings, registry, router, HealthMonitor(registry, settings.routing), access), registry


@contextlib.asynccontextmanager
async def serving(settings: Settings, access: AccessParts | None = None) -> AsyncIterator[Server]:
    """The app with its lifespan running, and a client on it."""
    app, registry = build(settings, access)
    async with app.router.lifespan_context(app):
        await registry.wait_loaded()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://inhouse.test") as client:
            yield Server(client, registry)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    """Auth off: no keys, no audit log."""
    async with serving(settings_for(tmp_path)) as running:
        yield running


@dataclass
class Secrets:
    admin: str
    scoped: str  # may use "chat" only
    revoked: str


@pytest.fixture
async def keyed(tmp_path: Path) -> AsyncIterator[tuple[Server, Secrets]]:
    """Auth on: a real SQLite key store and audit log in tmp_path."""
    db = Database(f"sqlite:///{tmp_path / 'inhouse.db'}")
    db.migrate()
    keys = KeyStore(db, cache_seconds=0)
    _, admin = keys.create("admin", admin=True)
    _, scoped = keys.create("app", models=["chat"])
    revoked_key, revoked = keys.create("old")
    keys.revoke(revoked_key.id)
    access = AccessParts(db=db, keys=keys, audit=AuditWriter(db))
    try:
        async with serving(settings_for(tmp_path, auth="keys"), access) as running:
            yield running, Secrets(admin, scoped, revoked)
    finally:
        db.close()


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def chat(model: str = "chat", **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": HELLO, **fields}


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def events_of(response: httpx.Response) -> list[Any]:
    """The SSE body's events: JSON payloads, ``[DONE]`` as the string; keep-alive comments skipped."""
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = response.content.split(b"\n\n")
    assert frames[-1] == b"", "the body must end with a blank line"
    out: list[Any] = []
    for frame in frames[:-1]:
        if frame.startswith(b":"):
            continue
        assert frame.startswith(b"data: ") and b"\n" not in frame, frame
        data = frame[len(b"data: "):]
        out.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return out


# ---- routing and errors that need no model ------------------------------------------------------------


async def test_unknown_model_is_404_naming_the_param(server: Server) -> None:
    response = await server.client.post("/v1/chat/completions", json=chat("gpt-17"))
    assert response.status_code == 404
    error = error_of(response)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert error["type"] == "invalid_request_error" and "chat" in error["message"]


async def test_unknown_path_is_404(server: Server) -> None:
    response = await server.client.get("/v1/nothing-here")
    assert response.status_code == 404 and error_of(response)["code"] == "not_found"


async def test_wrong_method_is_405(server: Server) -> None:
    response = await server.client.get("/v1/chat/completions")
    assert response.status_code == 405
    assert error_of(response)["code"] == "method_not_allowed"
    assert "POST" in response.headers.get("allow", "")


@pytest.mark.parametrize(("body", "param"), [
    (chat(temperature=3), "temperature"),
    (chat(max_tokens=0), "max_tokens"),
    ({"model": "chat"}, "messages"),
    ({"model": "chat", "messages": []}, "messages"),
    ({"model": "chat", "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    (chat(n=9), "n"),  # more choices than max_choices
    (chat(top_logprobs=2), "top_logprobs"),  # without logprobs
])
async def test_invalid_requests_are_400_naming_the_param(server: Server, body: dict[str, Any], param: str) -> None:
    response = await server.client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["code"] == "invalid_request" and error["param"] == param


@pytest.mark.parametrize("raw", [b"", b"{not json", b"[1, 2]", b"\xff\xfe"])
async def test_a_body_that_is_not_a_json_object_is_400(server: Server, raw: bytes) -> None:
    response = await server.client.post("/v1/chat/completions", content=raw,
                                        headers={"content-type": "application/json"})
    assert response.status_code == 400 and error_of(response)["code"] == "invalid_json"


async def test_an_oversized_request_is_a_400_from_the_engine(server: Server) -> None:
    response = await server.client.post("/v1/chat/completions", json=chat(max_tokens=10**6))
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"


async def test_every_response_carries_a_request_id(server: Server) -> None:
    client = server.client
    responses = [
        await client.get("/health"),
        await client.get("/ready"),
        await client.get("/v1/models"),
        await client.get("/v1/nothing"),
        await client.get("/v1/chat/completions"),
        await client.post("/v1/chat/completions", json={"model": "chat"}),
        await client.post("/v1/chat/completions", json=chat()),
        await client.post("/v1/chat/completions", json=chat(stream=True)),
    ]
    ids = [r.headers.get("x-request-id") for r in responses]
    assert all(ids), list(zip([r.status_code for r in responses], ids, strict=True))
    assert len(set(ids)) == len(ids)


async def test_a_bug_behind_any_route_is_a_500_with_a_request_id(server: Server) -> None:
    """Public routes too (issue 8): a bug there was re-raised to the server, which dropped the connection, and
    its 500 had no x-request-id."""
    engine = server.registry.find("chat")[0].engine

    def broken() -> None:
        raise RuntimeError("a bug")

    engine.stats = broken  # type: ignore[method-assign]
    for path in ("/health", "/metrics", "/admin/models"):
        response = await server.client.get(path)  # the transport raises what the app re-raises
        assert response.status_code == 500 and error_of(response)["code"] == "internal_error", path
        assert response.headers.get("x-request-id"), path


async def test_chat_answers_with_and_without_the_v1_prefix(server: Server) -> None:
    for path in ("/v1/chat/completions", "/chat/completions"):
        response = await server.client.post(path, json=chat())
        assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == REPLY


# ---- health ----------------------------------------------------------------------------------------------


async def test_ready_is_503_until_the_models_are_loaded(tmp_path: Path) -> None:
    app, registry = build(settings_for(tmp_path))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://inhouse.test") as client:
        response = await client.get("/ready")  # no lifespan yet: nothing has started loading
        assert response.status_code == 503 and response.json()["status"] == "loading"
        health = await client.get("/health")
        assert health.status_code == 200 and health.json()["models"]["chat"]["state"] == "loading"
        async with app.router.lifespan_context(app):
            await registry.wait_loaded()
            response = await client.get("/ready")
            assert response.status_code == 200 and response.json()["status"] == "ready"
            assert set(response.json()["models"].values()) == {"ready"}


async def test_health_lists_every_model_and_its_deployment(server: Server) -> None:
    response = await server.client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and set(body["models"]) == {"chat", "other", "primary", "backup", "broken"}
    chat_health = body["models"]["chat"]
    assert chat_health["state"] == "ready" and chat_health["circuit"] == "closed" and chat_health["in_flight"] == 0
    assert [d["deployment"] for d in chat_health["deployments"]] == ["chat"]


# ---- keys --------------------------------------------------------------------------------------------------


async def test_no_key_is_401(keyed: tuple[Server, Secrets]) -> None:
    server, _ = keyed
    response = await server.client.post("/v1/chat/completions", json=chat())
    assert response.status_code == 401
    error = error_of(response)
    assert error["code"] == "invalid_api_key" and error["type"] == "authentication_error"
    assert response.headers.get("x-request-id")


@pytest.mark.parametrize("header", [
    {"Authorization": "Bearer ih-not-a-real-key"},
    {"Authorization": "Bearer"},
    {"Authorization": ""},  # Dify sends an empty one: the same as none
    {"x-api-key": "ih-wrong"},
])
async def test_a_bad_key_is_401(keyed: tuple[Server, Secrets], header: dict[str, str]) -> None:
    server, _ = keyed
    response = await server.client.get("/v1/models", headers=header)
    assert response.status_code == 401 and error_of(response)["code"] == "invalid_api_key"


async def test_a_revoked_key_is_401_saying_so(keyed: tuple[Server, Secrets]) -> None:
    server, secrets = keyed
    response = await server.client.get("/v1/models", headers=bearer(secrets.revoked))
    assert response.status_code == 401 and "revoked" in error_of(response)["message"]


async def test_a_key_works_as_bearer_or_x_api_key(keyed: tuple[Server, Secrets]) -> None:
    server, secrets = keyed
    for headers in (bearer(secrets.scoped), {"x-api-key": secrets.scoped}):
        response = await server.client.post("/v1/chat/completions", json=chat(), headers=headers)
        assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == REPLY


async def test_a_key_scoped_to_other_models_is_403(keyed: tuple[Server, Secrets]) -> None:
    server, secrets = keyed
    response = await server.client.post("/v1/chat/completions", json=chat("other"), headers=bearer(secrets.scoped))
    assert response.status_code == 403
    error = error_of(response)
    assert error["code"] == "model_not_allowed" and error["param"] == "model" and error["type"] == "permission_error"


async def test_an_unknown_model_is_404_before_the_scope_is_403(keyed: tuple[Server, Secrets]) -> None:
    server, secrets = keyed
    response = await server.client.post("/v1/chat/completions", json=chat("nope"), headers=bearer(secrets.scoped))
    assert response.status_code == 404 and error_of(response)["code"] == "model_not_found"


async def test_admin_routes_need_an_admin_key(keyed: tuple[Server, Secrets]) -> None:
    server, secrets = keyed
    response = await server.client.get("/admin/keys", headers=bearer(secrets.scoped))
    assert response.status_code == 403 and error_of(response)["code"] == "admin_required"
    response = await server.client.get("/admin/keys", headers=bearer(secrets.admin))
    assert response.status_code == 200
    assert {k["name"] for k in response.json()["data"]} == {"admin", "app", "old"}


async def test_models_lists_only_what_the_key_may_use(keyed: tuple[Server, Secrets]) -> None:
    server, secrets = keyed
    scoped = await server.client.get("/v1/models", headers=bearer(secrets.scoped))
    assert scoped.status_code == 200 and [m["id"] for m in scoped.json()["data"]] == ["chat"]
    everything = await server.client.get("/v1/models", headers=bearer(secrets.admin))
    assert [m["id"] for m in everything.json()["data"]] == ["chat", "other", "primary", "backup", "broken"]
    hidden = await server.client.get("/v1/models/other", headers=bearer(secrets.scoped))
    assert hidden.status_code == 404 and error_of(hidden)["code"] == "model_not_found"
    card = await server.client.get("/v1/models/chat", headers=bearer(secrets.scoped))
    assert card.status_code == 200 and card.json()["id"] == "chat" and card.json()["object"] == "model"


async def test_health_and_ready_need_no_key(keyed: tuple[Server, Secrets]) -> None:
    server, _ = keyed
    assert (await server.client.get("/health")).status_code == 200
    assert (await server.client.get("/ready")).status_code == 200


async def test_a_call_is_in_the_audit_log_under_its_request_id(keyed: tuple[Server, Secrets]) -> None:
    server, secrets = keyed
    response = await server.client.post("/v1/chat/completions", json=chat(), headers=bearer(secrets.scoped))
    assert response.status_code == 200
    refused = await server.client.post("/v1/chat/completions", json=chat("other"), headers=bearer(secrets.scoped))
    assert refused.status_code == 403
    rows = (await server.client.get("/admin/audit", headers=bearer(secrets.admin))).json()["data"]
    by_id = {row["request_id"]: row for row in rows}
    answered = by_id[response.headers["x-request-id"]]
    assert answered["status"] == 200 and answered["key_name"] == "app" and answered["model"] == "chat"
    assert answered["prompt_tokens"] == PROMPT_TOKENS and answered["completion_tokens"] == 3
    denied = next(row for row in rows if row["status"] == 403)
    assert denied["error_code"] == "model_not_allowed" and denied["model"] == "other"


# ---- chat on the fake engine ------------------------------------------------------------------------------


async def test_blocking_chat_with_exact_usage(server: Server) -> None:
    response = await server.client.post("/v1/chat/completions", json=chat())
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == "chat"
    assert body["id"] == response.headers["x-request-id"]
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": REPLY},
                                "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 3,
                             "total_tokens": PROMPT_TOKENS + 3}
    assert response.headers["x-inhouse-deployment"] == "chat"


async def test_max_tokens_cuts_the_answer_with_finish_length(server: Server) -> None:
    body = (await server.client.post("/v1/chat/completions", json=chat(max_tokens=2))).json()
    assert body["choices"][0]["message"]["content"] == "one two "
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 2


async def test_a_stop_string_ends_the_answer_before_it(server: Server) -> None:
    body = (await server.client.post("/v1/chat/completions", json=chat(stop=["three"]))).json()
    assert body["choices"][0]["message"]["content"] == "one two "
    assert body["choices"][0]["finish_reason"] == "stop"


async def test_streaming_chat_event_order_and_usage(server: Server) -> None:
    response = await server.client.post("/v1/chat/completions", json=chat(stream=True))
    assert response.status_code == 200 and response.headers["x-inhouse-deployment"] == "chat"
    events = events_of(response)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "chat" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == REPLY
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "stop"
    assert last["usage"] == {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 3, "total_tokens": PROMPT_TOKENS + 3}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


async def test_streaming_with_include_usage_ends_with_a_usage_chunk(server: Server) -> None:
    response = await server.client.post("/v1/chat/completions",
                                        json=chat(stream=True, stream_options={"include_usage": True}))
    events = events_of(response)
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 3,
                                    "total_tokens": PROMPT_TOKENS + 3}
    assert events[-3]["choices"][0]["finish_reason"] == "stop" and events[-3]["usage"] is None
    assert events[-1] == "[DONE]"


async def test_the_fallback_answers_when_the_model_cannot(server: Server) -> None:
    await server.registry.get("primary").engine.close()  # its only deployment is gone: 503, worth a fallback
    response = await server.client.post("/v1/chat/completions", json=chat("primary"))
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "backup" and body["choices"][0]["message"]["content"] == BACKUP_REPLY
    assert response.headers["x-inhouse-deployment"] == "backup"
    streamed = await server.client.post("/v1/chat/completions", json=chat("primary", stream=True))
    chunks = events_of(streamed)[:-1]
    assert {c["model"] for c in chunks} == {"backup"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == BACKUP_REPLY


async def test_without_a_fallback_a_model_that_cannot_answer_is_503(server: Server) -> None:
    await server.registry.get("other").engine.close()
    response = await server.client.post("/v1/chat/completions", json=chat("other"))
    assert response.status_code == 503 and error_of(response)["code"] == "model_unavailable"


async def test_n_choices_blocking(server: Server) -> None:
    body = (await server.client.post("/v1/chat/completions", json=chat(n=3))).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(c["message"]["content"] == REPLY and c["finish_reason"] == "stop" for c in body["choices"])
    assert body["usage"] == {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 9, "total_tokens": PROMPT_TOKENS + 9}


async def test_n_choices_streaming(server: Server) -> None:
    events = events_of(await server.client.post("/v1/chat/completions", json=chat(n=2, stream=True)))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert [c["choices"][0]["index"] for c in chunks[:2]] == [0, 1]  # every choice opens first
    text = {0: "", 1: ""}
    finishes = []
    for chunk in chunks:
        (choice,) = chunk["choices"]
        text[choice["index"]] += choice["delta"].get("content", "")
        if choice["finish_reason"] is not None:
            finishes.append(chunk)
    assert text == {0: REPLY, 1: REPLY}
    assert len(finishes) == 2 and finishes[-1] is chunks[-1]
    assert finishes[-1]["usage"] == {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 6,
                                     "total_tokens": PROMPT_TOKENS + 6}


async def test_an_engine_failure_mid_stream_is_one_error_event_then_done(server: Server) -> None:
    response = await server.client.post("/v1/chat/completions", json=chat("broken", stream=True))
    assert response.status_code == 200  # the stream had started
    events = events_of(response)
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1 and errors[0]["error"]["code"] == "engine_error"
    assert events[-2] is errors[0] and events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2]) == "a "


async def test_an_engine_failure_before_a_blocking_answer_is_500(server: Server) -> None:
    response = await server.client.post("/v1/chat/completions", json=chat("broken"))
    assert response.status_code == 500
    assert error_of(response)["code"] == "engine_error" and response.headers.get("x-request-id")


async def test_finished_calls_leave_nothing_in_flight(server: Server) -> None:
    await server.client.post("/v1/chat/completions", json=chat(n=2))
    await server.client.post("/v1/chat/completions", json=chat(stream=True))
    await server.client.post("/v1/chat/completions", json=chat("broken", stream=True))
    assert all(d.route.outstanding == 0 for d in server.registry.all())
    health = (await server.client.get("/health")).json()
    assert all(m["in_flight"] == 0 and m["running"] == 0 for m in health["models"].values())


async def test_the_audit_search_filters_by_status_on_the_server(keyed: tuple[Server, Secrets]) -> None:
    server, secrets = keyed
    refused = await server.client.post("/v1/chat/completions", json=chat("other"), headers=bearer(secrets.scoped))
    assert refused.status_code == 403
    admin = bearer(secrets.admin)

    async def rows(status: str) -> list[dict[str, object]]:
        for _ in range(100):  # the row is written behind the answer
            found = (await server.client.get("/admin/audit", params={"status": status, "limit": 1000},
                                             headers=admin)).json()["data"]
            if found:
                return list(found)
            await asyncio.sleep(0.05)
        return []

    errors = await rows("4xx")
    assert errors and all(400 <= int(str(r["status"])) < 500 for r in errors)
    assert refused.headers["x-request-id"] in {r["request_id"] for r in errors}
    assert all(r["status"] == 403 for r in await rows("403"))
    bad = await server.client.get("/admin/audit", params={"status": "4x"}, headers=admin)
    assert bad.status_code == 400 and error_of(bad)["param"] == "status"
