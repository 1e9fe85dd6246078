"""``GET /openapi.json``: the OpenAPI 3.1 description of every route, built once when the app is made.

Owns the route table as clients see it: paths, request and response models, which error codes each route
can answer with (their statuses come from the one table in ``inhouse.errors``), the headers it sends, and
which routes need a key.  The schemas are the protocol models' own JSON Schemas; nothing is written by hand
but the table below.  It holds no behaviour: the routes stay the truth, and ``tests/e2e/test_openapi.py``
fuzzes a real server against this document (Schemathesis) to keep the two in step.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from inhouse import __version__
from inhouse.errors import STATUS, ErrorCode
from inhouse.errors import ErrorCode as E
from inhouse.protocol import responses as r
from inhouse.protocol.chat import ChatCompletionRequest
from inhouse.protocol.completions import CompletionRequest
from inhouse.protocol.embeddings import EmbeddingRequest, RerankRequest
from inhouse.server.render import json_response
from inhouse.server.routes.adapters import AdapterLoad
from inhouse.server.routes.admin import KeyCreate
from inhouse.server.routes.swaps import SwapBody

__all__ = ["OPENAPI_PATH", "build_openapi", "openapi_route"]

OPENAPI_PATH = "/openapi.json"
_REF = "#/components/schemas/{model}"
_SCHEMES = ("bearer", "apiKeyHeader")  # either one: Authorization: Bearer, or x-api-key
# every keyed route: the access middleware's answers, and any unexpected failure
_KEYED = (E.INVALID_API_KEY, E.RATE_LIMITED, E.QUOTA_EXCEEDED, E.AUDIT_UNAVAILABLE, E.INTERNAL, E.SERVER_DRAINING)
_ADMIN = (*_KEYED, E.ADMIN_REQUIRED, E.UNSUPPORTED)  # unsupported: the server runs with auth: none
_GENERATE = (*_KEYED, E.INVALID_REQUEST, E.INVALID_JSON, E.UNSUPPORTED, E.CONTEXT_LENGTH_EXCEEDED,
             E.MODEL_NOT_FOUND, E.WRONG_MODEL_KIND, E.MODEL_NOT_ALLOWED, E.BODY_TOO_LARGE, E.QUEUE_FULL,
             E.MODEL_LOADING, E.MODEL_UNAVAILABLE, E.UPSTREAM_UNAVAILABLE, E.UPSTREAM_ERROR, E.ENGINE_ERROR)
_ENCODE = (*_KEYED, E.INVALID_REQUEST, E.INVALID_JSON, E.CONTEXT_LENGTH_EXCEEDED, E.MODEL_NOT_FOUND,
           E.WRONG_MODEL_KIND, E.MODEL_NOT_ALLOWED, E.BODY_TOO_LARGE, E.QUEUE_FULL, E.MODEL_LOADING,
           E.MODEL_UNAVAILABLE, E.UPSTREAM_UNAVAILABLE, E.ENGINE_ERROR)
_RATE_HEADERS = tuple(f"x-ratelimit-{part}-{unit}" for part in ("limit", "remaining", "reset")
                      for unit in ("requests", "tokens"))


@dataclass(frozen=True)
class _Op:
    method: str
    path: str
    operation_id: str
    summary: str
    tag: str
    ok: dict[int, type[BaseModel]]  # status → JSON body
    errors: tuple[ErrorCode, ...]
    body: type[BaseModel] | None = None
    stream: type[BaseModel] | None = None  # the data: events of a 200 text/event-stream answer
    params: tuple[dict[str, Any], ...] = ()
    public: bool = False
    links: tuple[str, ...] = ()  # operations that take this answer's id as their {key}


def _param(name: str, where: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": where, "required": where == "path", "schema": schema, "description": description}


def _api(prefix: str) -> list[_Op]:
    suffix = "" if prefix else "_unprefixed"
    model_id = _param("model_id", "path", {"type": "string"}, "a model name; it may contain '/'")
    return [
        _Op("post", f"{prefix}/chat/completions", "createChatCompletion" + suffix, "Chat completion", "generation",
            {200: r.ChatCompletion}, _GENERATE, body=ChatCompletionRequest, stream=r.ChatCompletionChunk),
        _Op("post", f"{prefix}/completions", "createCompletion" + suffix, "Text completion", "generation",
            {200: r.Completion}, _GENERATE, body=CompletionRequest, stream=r.CompletionChunk),
        _Op("post", f"{prefix}/embeddings", "createEmbedding" + suffix, "Embeddings of texts or token ids",
            "embeddings", {200: r.EmbeddingList}, _ENCODE, body=EmbeddingRequest),
        _Op("post", f"{prefix}/rerank", "rerank" + suffix, "Documents by relevance to a query (Jina/Cohere)",
            "embeddings", {200: r.RerankResult}, _ENCODE, body=RerankRequest),
        _Op("get", f"{prefix}/models", "listModels" + suffix, "The models this key may use", "models",
            {200: r.ModelList}, _KEYED),
        _Op("get", f"{prefix}/models/{{model_id}}", "retrieveModel" + suffix, "One model's card", "models",
            {200: r.ModelCard}, (*_KEYED, E.MODEL_NOT_FOUND), params=(model_id,)),
    ]


def _operations() -> list[_Op]:
    found = (*_ADMIN, E.NOT_FOUND)
    by_id = ("showKey", "revokeKey", "rotateKey")
    key = _param("key", "path", {"type": "string", "pattern": "^[^/]+$"},
                 "a key's id (key_...) or name (the newest active key of that name)")
    audit_query = (
        _param("since", "query", {"type": "number"}, "rows at or after this time (unix seconds)"),
        _param("until", "query", {"type": "number"}, "rows before this time (unix seconds)"),
        _param("key", "query", {"type": "string"}, "a key's id or name"),
        _param("model", "query", {"type": "string"}, "the model asked or served"),
        _param("status", "query", {"type": "string", "pattern": "^[1-5]([0-9][0-9]|xx)$"},
               "an HTTP status (429) or a class of them (4xx)"),
        _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 10_000, "default": 100},
               "at most this many rows"),
    )
    return [
        *_api("/v1"),
        *_api(""),
        _Op("post", "/v2/rerank", "rerankV2", "Rerank, at Cohere v2's path (same body and answer)", "embeddings",
            {200: r.RerankResult}, _ENCODE, body=RerankRequest),
        _Op("get", "/health", "health", "Liveness and each model's engine state", "health",
            {200: r.Health, 503: r.Health}, (E.INTERNAL,), public=True),
        _Op("get", "/ready", "ready", "200 when every model is loaded and the server is not draining, else 503",
            "health",
            {200: r.Ready, 503: r.Ready}, (E.INTERNAL,), public=True),
        _Op("get", "/admin/keys", "listKeys", "Every key, revoked ones too", "admin", {200: r.ApiKeyList}, _ADMIN),
        _Op("post", "/admin/keys", "createKey", "A new key; its secret is shown once", "admin",
            {201: r.NewApiKey}, (*_ADMIN, E.INVALID_REQUEST, E.INVALID_JSON, E.BODY_TOO_LARGE), body=KeyCreate,
            links=by_id),
        _Op("get", "/admin/keys/{key}", "showKey", "One key", "admin", {200: r.ApiKey}, found, params=(key,)),
        _Op("post", "/admin/keys/{key}/revoke", "revokeKey", "Revoke a key (idempotent)", "admin",
            {200: r.ApiKey}, found, params=(key,)),
        _Op("post", "/admin/keys/{key}/rotate", "rotateKey", "A new secret for the key; the old one is revoked",
            "admin", {201: r.NewApiKey}, found, params=(key,), links=by_id),
        _Op("get", "/admin/audit", "searchAudit", "Audit rows, newest first", "admin", {200: r.AuditList},
            (*_ADMIN, E.INVALID_REQUEST), params=audit_query),
        _Op("get", "/admin/audit/verify", "verifyAudit", "Check the audit log's hash chain", "admin",
            {200: r.AuditVerification}, _ADMIN),
        _Op("get", "/admin/models", "listModelStates", "Every model's state and its deployments'", "admin",
            {200: r.AdminModelList}, _ADMIN),
        *_swaps_and_adapters(),
    ]


def _swaps_and_adapters() -> list[_Op]:
    name = _param("name", "path", {"type": "string"}, "a model name; it may contain '/'")
    body = (*_ADMIN, E.INVALID_REQUEST, E.INVALID_JSON, E.BODY_TOO_LARGE)
    return [
        _Op("post", "/admin/models/{name}/swap", "swapModel", "Swap in a new version, health-gated, or canary it "
            "(docs/swaps.md)", "admin", {200: r.SwapResult}, (*body, E.MODEL_NOT_FOUND, E.SWAP_FAILED),
            body=SwapBody, params=(name,)),
        _Op("post", "/admin/models/{name}/rollback", "rollbackModel", "Bring the previous version back", "admin",
            {200: r.SwapResult}, (*_ADMIN, E.MODEL_NOT_FOUND, E.SWAP_FAILED), params=(name,)),
        _Op("get", "/admin/models/{name}", "showModelStatus", "A model's versions, canary and last swap", "admin",
            {200: r.ModelStatus}, (*_ADMIN, E.MODEL_NOT_FOUND), params=(name,)),
        _Op("post", "/admin/reload", "reloadConfig", "Re-read the config file: added models load, removed ones "
            "drain, changed ones swap", "admin", {200: r.ReloadResult}, (*_ADMIN, E.INVALID_REQUEST)),
        _Op("get", "/admin/adapters", "listAdapters", "The LoRA adapter models (docs/lora.md)", "admin",
            {200: r.AdapterList}, _ADMIN),
        _Op("post", "/admin/adapters", "loadAdapter", "Serve a LoRA adapter under its own name over a base model",
            "admin", {200: r.Adapter}, body, body=AdapterLoad),
        _Op("delete", "/admin/adapters/{name}", "unloadAdapter", "Stop serving an adapter; returns once its "
            "requests in flight finished", "admin", {200: r.AdapterDeleted},
            (*_ADMIN, E.INVALID_REQUEST, E.MODEL_NOT_FOUND), params=(name,)),
    ]


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _json(model: type[BaseModel]) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(model)}}


def _headers(*names: str) -> dict[str, Any]:
    return {name: {"$ref": f"#/components/headers/{name}"} for name in names}


def _sse_event(chunk: type[BaseModel]) -> dict[str, Any]:
    """One event of a stream, as OpenAPI 3.2's ``itemSchema`` puts it (3.1 has no word for it: Schemathesis
    reads a text/event-stream ``schema`` as one event): no ``event:`` or ``id:`` lines, ``data`` is a chunk,
    the one error event, or ``[DONE]``.  Keep-alive comments are not events."""
    json_data = {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"anyOf": [_ref(chunk), _ref(r.StreamError)]}}
    return {"type": "object", "required": ["data"],
            "properties": {"event": {"const": "message"}, "data": {"anyOf": [{"const": "[DONE]"}, json_data]}}}


def _responses(op: _Op) -> dict[str, Any]:
    limits = () if op.public else _RATE_HEADERS
    out: dict[str, Any] = {}
    for status, model in op.ok.items():
        response: dict[str, Any] = {"description": model.__doc__ or op.summary, "content": _json(model),
                                    "headers": _headers("x-request-id", *limits)}
        if op.stream is not None:
            response["description"] = ("a JSON body; with stream: true an SSE stream of data: events, each one "
                                       f"{op.stream.__name__} (or one StreamError), then data: [DONE]")
            response["content"]["text/event-stream"] = {"schema": _sse_event(op.stream)}
            response["headers"] |= _headers("x-inhouse-deployment")
        if op.links:
            response["links"] = {name: {"operationId": name, "parameters": {"key": "$response.body#/id"}}
                                 for name in op.links}
        out[str(status)] = response
    by_status: dict[int, list[str]] = defaultdict(list)
    for code in op.errors:
        by_status[STATUS[code]].append(code.value)
    for status, codes in sorted(by_status.items()):
        extra = ("Retry-After", *(limits if status == 429 else ())) if status in (429, 503) else ()
        out[str(status)] = {"description": "error code: " + ", ".join(codes), "content": _json(r.ErrorResponse),
                            "headers": _headers("x-request-id", *extra)}
    return out


def _operation(op: _Op, example_model: str | None) -> dict[str, Any]:
    doc: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary, "tags": [op.tag],
                           "security": [] if op.public else [{s: []} for s in _SCHEMES], "responses": _responses(op)}
    if op.params:
        doc["parameters"] = list(op.params)
    if op.body is not None:
        content = _json(op.body)
        if op.body in (ChatCompletionRequest, CompletionRequest) and example_model is not None:
            prompt: dict[str, Any] = ({"messages": [{"role": "user", "content": "Hello"}]}
                                      if op.body is ChatCompletionRequest else {"prompt": "Once upon a time"})
            content["application/json"]["example"] = {"model": example_model, **prompt, "max_tokens": 16}
        doc["requestBody"] = {"required": True, "content": content}
    return doc


def _schemas(models: list[tuple[type[BaseModel], str]]) -> dict[str, Any]:
    """Each model's JSON Schema and the models it nests, under their class names (a clash is a bug here)."""
    out: dict[str, Any] = {}
    for model, mode in models:
        schema = model.model_json_schema(ref_template=_REF, mode=mode)  # type: ignore[arg-type]
        for name, sub in {**schema.pop("$defs", {}), model.__name__: schema}.items():
            if out.setdefault(name, sub) != sub:
                raise RuntimeError(f"two different schemas are both named {name!r}")
    return out


def _components(ops: list[_Op]) -> dict[str, Any]:
    requests = {op.body for op in ops if op.body is not None}
    answers = {m for op in ops for m in (*op.ok.values(), op.stream) if m is not None}
    models = [(m, "validation") for m in sorted(requests, key=lambda m: m.__name__)]
    models += [(m, "serialization") for m in sorted(answers | {r.ErrorResponse, r.StreamError},
                                                    key=lambda m: m.__name__)]
    text = {"schema": {"type": "string"}}
    headers = {
        "x-request-id": {**text, "required": True, "description": "the call's id: a completion's own (chatcmpl-..., "
                                                                  "cmpl-...), else its audit row's (req-...)"},
        "x-inhouse-deployment": {**text, "required": True, "description": "the deployment that answered"},
        "Retry-After": {"schema": {"type": "integer"}, "description": "seconds to wait before retrying"},
        **{h: {**text, "description": "the key's limits (sent when the key has rpm / tpm)"} for h in _RATE_HEADERS},
    }
    return {
        "schemas": _schemas(models),
        "headers": headers,
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "an API key (ih-...)"},
            "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "x-api-key",
                             "description": "the same API key, for clients that cannot send Authorization"},
        },
    }


def _metrics_operation(public: bool) -> dict[str, Any]:
    """``GET /metrics``: Prometheus text; a key's errors only when it needs one (``metrics_public: false``)."""
    op = _Op("get", "/metrics", "metrics", "Prometheus metrics (text format 0.0.4)", "health", {}, () if public
             else (E.INVALID_API_KEY, E.RATE_LIMITED, E.QUOTA_EXCEEDED, E.AUDIT_UNAVAILABLE, E.INTERNAL),
             public=public)
    doc = _operation(op, None)
    doc["responses"]["200"] = {"description": "every inhouse_* metric (docs/metrics.md)",
                               "headers": _headers("x-request-id", *(() if public else _RATE_HEADERS)),
                               "content": {"text/plain": {"schema": {"type": "string"}}}}
    return doc


def _metrics_models_operation(public: bool) -> dict[str, Any]:
    """``GET /metrics/models``: the same numbers as ``/metrics`` per model, as JSON (the console reads it);
    public exactly when ``/metrics`` is."""
    doc = _metrics_operation(public)
    doc.update(operationId="metricsModels", summary="Per-model request rate, TTFT and error rate, as JSON")
    doc["responses"]["200"] = {**doc["responses"]["200"], "description": "one entry per model (docs/metrics.md)",
                               "content": {"application/json": {"schema": {"type": "object"}}}}
    return doc


def build_openapi(example_model: str | None = None, metrics_public: bool = True) -> dict[str, Any]:
    """The whole document; ``example_model`` (a served model's name) fills the request examples."""
    ops = _operations()
    paths: dict[str, dict[str, Any]] = defaultdict(dict)
    for op in ops:
        paths[op.path][op.method] = _operation(op, example_model)
    paths["/metrics"]["get"] = _metrics_operation(metrics_public)
    paths["/metrics/models"]["get"] = _metrics_models_operation(metrics_public)
    paths[OPENAPI_PATH]["get"] = {
        "operationId": "openapi", "summary": "This document", "tags": ["health"], "security": [],
        "responses": {"200": {"description": "OpenAPI 3.1", "headers": _headers("x-request-id"),
                              "content": {"application/json": {"schema": {"type": "object"}}}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "inhouse", "version": __version__,
                 "description": "OpenAI-compatible API for your own models. Every route except /health, /ready, "
                                "/openapi.json and (unless metrics_public: false) /metrics needs an API key "
                                "(Authorization: Bearer ih-...), unless the server runs with auth: none. Every path "
                                "under /v1 is also served without /v1."},
        "paths": dict(paths),
        "components": _components(ops),
    }


def openapi_route(document: dict[str, Any]) -> Route:
    async def openapi(request: Request) -> Response:
        return json_response(document)

    return Route(OPENAPI_PATH, openapi, methods=["GET"])
