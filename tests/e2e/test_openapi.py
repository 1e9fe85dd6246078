"""``GET /openapi.json`` against the real CLI (``auth: keys``, the fake engine): the document and the server agree.

First the document itself: public, valid OpenAPI 3.1, every route, a key on every route but the public ones,
and real answers of every route validate against it.  Then Schemathesis fuzzes every operation with the admin
key (seeded, a short run): no 5xx, every status documented, every body as documented.  A longer run with all
of Schemathesis' checks: ``scripts/schemathesis.sh``.
"""

from __future__ import annotations

import time
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis import Case, HookContext, engine
from schemathesis.engine import events
from schemathesis.hooks import GLOBAL_HOOK_DISPATCHER
from schemathesis.specs.openapi.schemas import OpenApiSchema

from tests.e2e.helpers import keyed_server
from tests.process import ADMIN_KEY, ServerProcess

CONFIG = """
key_cache_seconds: 0.5
models:
  - {{name: echo, path: unused, engine: fake, fake_reply: "Hello there friend"}}
  - {{name: org/small, path: unused, engine: fake, context_length: 32}}
  - {{name: vec, engine: sentence-transformers, path: "{embedder}"}}
  - {{name: ranker, engine: sentence-transformers, path: "{cross_encoder}"}}
"""
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
ROUTES = {
    *(("post", p + "/chat/completions") for p in ("/v1", "")),
    *(("post", p + "/completions") for p in ("/v1", "")),
    *(("post", p + "/embeddings") for p in ("/v1", "")),
    *(("post", p + "/rerank") for p in ("/v1", "", "/v2")),
    *(("get", p + "/models") for p in ("/v1", "")),
    *(("get", p + "/models/{model_id}") for p in ("/v1", "")),
    ("get", "/health"), ("get", "/ready"), ("get", "/openapi.json"), ("get", "/metrics"), ("get", "/metrics/models"),
    ("get", "/admin/keys"), ("post", "/admin/keys"), ("get", "/admin/keys/{key}"),
    ("post", "/admin/keys/{key}/revoke"), ("post", "/admin/keys/{key}/rotate"),
    ("get", "/admin/audit"), ("get", "/admin/audit/verify"), ("get", "/admin/models"),
    ("post", "/admin/models/{name}/swap"), ("post", "/admin/models/{name}/rollback"), ("get", "/admin/models/{name}"),
    ("post", "/admin/reload"), ("get", "/admin/adapters"), ("post", "/admin/adapters"),
    ("delete", "/admin/adapters/{name}"),
}
PUBLIC = {"/health", "/ready", "/openapi.json", "/metrics", "/metrics/models"}
MODELS = ("echo", "org/small", "vec", "ranker")
CHECKS = ["not_a_server_error", "status_code_conformance", "response_schema_conformance", "content_type_conformance",
          "response_headers_conformance"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, logs_dir: Path, tiny_embedder_dir: Path,
           tiny_cross_encoder_dir: Path) -> Iterator[ServerProcess]:
    config = CONFIG.format(embedder=tiny_embedder_dir, cross_encoder=tiny_cross_encoder_dir)
    with keyed_server(tmp_path_factory.mktemp("openapi"), config, cache_dir, logs_dir / "openapi.log") as s:
        yield s


@pytest.fixture(scope="module")
def document(server: ServerProcess) -> dict[str, Any]:
    response = httpx.get(server.url + "/openapi.json", timeout=10)  # no key
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()  # type: ignore[no-any-return]


@pytest.fixture
def api_schema(server: ServerProcess) -> OpenApiSchema:
    """The served document as Schemathesis loads it: requests go to the server with the admin key; a short,
    derandomized run (the same cases every time), no example database."""
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    schema.config.update(base_url=server.url, headers=ADMIN, request_timeout=30)
    schema.config.generation.update(max_examples=25, deterministic=True, database="none")
    return schema


def test_document_is_public_valid_openapi_and_lists_every_route(document: dict[str, Any],
                                                                api_schema: OpenApiSchema) -> None:
    assert document["openapi"].startswith("3.1.")
    api_schema.validate()  # against the OpenAPI 3.1 meta-schema
    found = {(method, path) for path, item in document["paths"].items() for method in item}
    assert found == ROUTES
    schemes = document["components"]["securitySchemes"]
    assert (schemes["bearer"]["type"], schemes["bearer"]["scheme"]) == ("http", "bearer")
    assert (schemes["apiKeyHeader"]["in"], schemes["apiKeyHeader"]["name"]) == ("header", "x-api-key")
    for method, path in ROUTES:
        operation = document["paths"][path][method]
        if path in PUBLIC:
            assert operation["security"] == []
        else:
            assert {"bearer": []} in operation["security"], path
            assert {"401", "429", "500", "503"} <= set(operation["responses"]), path
            error = operation["responses"]["401"]["content"]["application/json"]["schema"]
            assert error == {"$ref": "#/components/schemas/ErrorResponse"}
    detail = document["components"]["schemas"]["ErrorDetail"]
    assert set(detail["required"]) == {"message", "type", "param", "code"}


def _validate(schema: OpenApiSchema, method: str, path: str, response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    assert response.headers.get("x-request-id"), response.headers  # documented on every answer
    schema[path][method.upper()].validate_response(response)


def test_real_answers_of_every_route_match_the_document(server: ServerProcess, api_schema: OpenApiSchema) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as anyone, \
            httpx.Client(base_url=server.url, headers=ADMIN, timeout=30) as admin:
        for path in ("/health", "/ready", "/openapi.json", "/metrics", "/metrics/models"):
            _validate(api_schema, "get", path, anyone.get(path))
        for prefix in ("/v1", ""):
            _validate(api_schema, "get", prefix + "/models", admin.get(prefix + "/models"))
            _validate(api_schema, "get", prefix + "/models", anyone.get(prefix + "/models"))  # 401
            for name in ("echo", "org/small", "missing"):
                _validate(api_schema, "get", prefix + "/models/{model_id}", admin.get(f"{prefix}/models/{name}"))
            for route, body in (("/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                                ("/completions", {"prompt": "hi", "echo": True})):
                for extra in ({}, {"stream": True}, {"stream": True, "stream_options": {"include_usage": True}},
                              {"n": 2, "max_tokens": 2}, {"max_tokens": 100, "model": "org/small"}, {"model": ""}):
                    answer = admin.post(prefix + route, json={"model": "echo", **body, **extra})
                    _validate(api_schema, "post", prefix + route, answer)
                    if answer.status_code == 200:
                        assert answer.headers["x-request-id"].startswith(("chatcmpl-", "cmpl-"))
            for body in ({"model": "vec", "input": "hi"}, {"model": "vec", "input": [[5, 6], [7]]},
                         {"model": "vec", "input": ["a", "b"], "encoding_format": "base64"},
                         {"model": "echo", "input": "hi"}, {"model": "vec", "input": ""}):
                _validate(api_schema, "post", prefix + "/embeddings", admin.post(prefix + "/embeddings", json=body))
            for body in ({"model": "ranker", "query": "q", "documents": ["a", {"text": "b"}], "top_n": 1},
                         {"model": "vec", "query": "q", "documents": ["a"], "return_documents": False},
                         {"model": "ranker", "query": "q", "documents": []}):
                _validate(api_schema, "post", prefix + "/rerank", admin.post(prefix + "/rerank", json=body))
        _validate(api_schema, "post", "/v2/rerank", admin.post("/v2/rerank", json={
            "model": "ranker", "query": "q", "documents": ["a"]}))
        made = admin.post("/admin/keys", json={"name": f"doc-{time.time_ns()}", "rpm": 100, "models": ["echo"]})
        _validate(api_schema, "post", "/admin/keys", made)
        secret, ident = made.json()["secret"], made.json()["id"]
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {secret}"}, timeout=30) as user:
            limited = user.get("/v1/models")  # x-ratelimit-* headers
            _validate(api_schema, "get", "/v1/models", limited)
            assert [m["id"] for m in limited.json()["data"]] == ["echo"]
            _validate(api_schema, "get", "/admin/keys", user.get("/admin/keys"))  # 403
        for request in (("get", "/admin/keys"), ("get", "/admin/audit"), ("get", "/admin/audit/verify"),
                        ("get", "/admin/models")):
            _validate(api_schema, *request, admin.request(request[0].upper(), request[1]))
        _validate(api_schema, "get", "/admin/audit", admin.get("/admin/audit", params={"limit": 3, "key": ident}))
        _validate(api_schema, "get", "/admin/audit", admin.get("/admin/audit", params={"since": "yesterday"}))
        for ident_or_name in (ident, "admin", "key_missing"):
            _validate(api_schema, "get", "/admin/keys/{key}", admin.get(f"/admin/keys/{ident_or_name}"))
        rotated = admin.post(f"/admin/keys/{ident}/rotate")
        _validate(api_schema, "post", "/admin/keys/{key}/rotate", rotated)
        for ident_or_name in (rotated.json()["id"], "key_missing"):
            _validate(api_schema, "post", "/admin/keys/{key}/revoke", admin.post(f"/admin/keys/{ident_or_name}/revoke"))


@pytest.fixture
def steered(server: ServerProcess) -> Iterator[None]:
    """A Schemathesis hook for one test: two thirds of the generated bodies name a served model (a random name
    is only ever a 404), and the admin key is never revoked or rotated (Schemathesis reuses the key ids it saw
    in ``GET /admin/keys``; revoking ours would turn the rest of the run into 401s).  Other keys may be."""
    admin_id = httpx.get(server.url + "/admin/keys/admin", headers=ADMIN, timeout=10).json()["id"]

    def before_call(context: HookContext, case: Case, kwargs: dict[str, Any]) -> None:
        if case.path.endswith(("/revoke", "/rotate")) and case.path_parameters.get("key") in ("admin", admin_id):
            case.path_parameters["key"] = "not-the-admin-key"
        model = case.body.get("model") if isinstance(case.body, dict) else None
        if isinstance(model, str) and isinstance(case.body, dict):
            pick = zlib.crc32(model.encode("utf-8", "surrogatepass")) % (len(MODELS) + 1)
            if pick:
                case.body["model"] = MODELS[pick - 1]

    schemathesis.hook(before_call)
    try:
        yield
    finally:
        GLOBAL_HOOK_DISPATCHER.unregister(before_call)


def test_schemathesis_finds_no_5xx_and_no_answer_outside_the_document(
        api_schema: OpenApiSchema, server: ServerProcess, steered: None) -> None:
    """Every phase (explicit examples, coverage of boundaries, random fuzzing, stateful chains), positive and
    negative data, 25 derandomized cases per operation, all with the admin key."""
    api_schema.config.phases.update(phases=["examples", "coverage", "fuzzing", "stateful"])
    api_schema.config.checks.update(included_check_names=CHECKS)
    api_schema.config.output.sanitization.update(enabled=False)  # reproducers with real values (a test key)
    failures: dict[tuple[str, str, str], str] = {}
    statuses: Counter[int] = Counter()
    for event in engine.from_schema(api_schema).execute():
        if isinstance(event, events.NonFatalError):
            failures[(event.label, "error", event.info.title)] = event.info.format()
        if isinstance(event, events.FatalError):
            failures[("run", "error", type(event.exception).__name__)] = repr(event.exception)
        if not isinstance(event, events.ScenarioFinished):
            continue
        recorder = event.recorder
        statuses.update(i.response.status_code for i in recorder.interactions.values() if i.response is not None)
        for checks in recorder.checks.values():
            for check in checks:
                if check.failure_info is not None:
                    failure = check.failure_info.failure
                    failures.setdefault((recorder.label, check.name, failure.title),
                                        f"{failure.message}\n{check.failure_info.code_sample}")
    assert httpx.get(server.url + "/admin/keys/admin", headers=ADMIN, timeout=10).status_code == 200
    assert statuses[200] > 100 and statuses[401] < statuses[200], statuses  # the run really was authenticated
    report = [f"{label} [{check}] {title}\n{detail}" for (label, check, title), detail in sorted(failures.items())]
    assert not report, f"{len(report)} distinct failures:\n\n" + "\n\n".join(report)
