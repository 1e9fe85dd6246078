"""``/admin/keys…`` and ``/admin/audit…``: key management and the read-only audit log, for admin keys only."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response

from inhouse.audit.query import search, verify
from inhouse.errors import ErrorCode, InhouseError
from inhouse.keys.store import KeyLimits, KeyStore
from inhouse.server.body import read_model
from inhouse.server.call import call_of
from inhouse.server.context import context_of
from inhouse.server.render import json_response
from inhouse.storage.database import Database

__all__ = ["audit_search", "audit_verify", "create_key", "list_keys", "revoke_key", "rotate_key", "show_key"]


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    admin: bool = False
    models: list[str] | None = None
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    max_concurrency: int | None = Field(default=None, ge=1)
    token_budget: int | None = Field(default=None, ge=1)
    budget_period: str | None = Field(default=None, pattern="^(day|month)$")
    expires_at: float | None = None


def _admin(request: Request) -> tuple[KeyStore, Database]:
    ctx = context_of(request)
    call = call_of(request)
    if ctx.keys is None or ctx.db is None:
        raise InhouseError(ErrorCode.UNSUPPORTED, "auth is off (auth: none): there are no keys to manage")
    if call is None or call.key is None or not call.key.admin:
        raise InhouseError(ErrorCode.ADMIN_REQUIRED, "this endpoint needs an admin API key")
    return ctx.keys, ctx.db


def _key_or_404(found: Any, ident: str) -> Any:
    if found is None:
        raise InhouseError(ErrorCode.NOT_FOUND, f"no API key with id or name {ident!r}")
    return found


async def list_keys(request: Request) -> Response:
    keys, _ = _admin(request)
    found = await asyncio.to_thread(keys.list)
    return json_response({"object": "list", "data": [k.public() for k in found]})


async def create_key(request: Request) -> Response:
    keys, _ = _admin(request)
    body = await read_model(request, KeyCreate, 64 * 1024)
    if body.token_budget is not None and body.budget_period is None:
        raise InhouseError(ErrorCode.INVALID_REQUEST, "token_budget needs budget_period (day or month)",
                           param="budget_period")
    limits = KeyLimits(body.rpm, body.tpm, body.max_concurrency, body.token_budget, body.budget_period)
    key, secret = await asyncio.to_thread(keys.create, body.name, admin=body.admin, models=body.models,
                                          limits=limits, expires_at=body.expires_at)
    return json_response({**key.public(), "secret": secret}, status=201)


async def show_key(request: Request) -> Response:
    keys, _ = _admin(request)
    ident = request.path_params["key"]
    return json_response(_key_or_404(await asyncio.to_thread(keys.get, ident), ident).public())


async def revoke_key(request: Request) -> Response:
    keys, _ = _admin(request)
    ident = request.path_params["key"]
    return json_response(_key_or_404(await asyncio.to_thread(keys.revoke, ident), ident).public())


async def rotate_key(request: Request) -> Response:
    keys, _ = _admin(request)
    ident = request.path_params["key"]
    key, secret = _key_or_404(await asyncio.to_thread(keys.rotate, ident), ident)
    return json_response({**key.public(), "secret": secret}, status=201)


def _number(request: Request, name: str) -> float | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        return float(raw)
    except ValueError:
        raise InhouseError(ErrorCode.INVALID_REQUEST, f"{name} must be a number (unix seconds)", param=name) \
            from None


async def audit_search(request: Request) -> Response:
    _, db = _admin(request)
    q = request.query_params
    since = _number(request, "since")
    limit = int(_number(request, "limit") or 100)
    rows = await asyncio.to_thread(search, db, since=since, until=_number(request, "until"), key=q.get("key"),
                                   model=q.get("model"), limit=max(1, min(limit, 10_000)))
    return json_response({"object": "list", "data": rows, "at": time.time()})


async def audit_verify(request: Request) -> Response:
    _, db = _admin(request)
    result = await asyncio.to_thread(verify, db)
    return json_response({"ok": result.ok, "rows": result.rows, "problem": result.problem})
