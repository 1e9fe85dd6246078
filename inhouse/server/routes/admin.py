"""``/admin/keys…``, ``/admin/audit…`` and ``/admin/models``: key management, the read-only audit log and the
served models' state (loading / ready / draining / failed, per deployment), for admin keys only.

Bodies are strict (no coercion: ``"yes"`` is not a bool, ``"5"`` not an int) and query parameters are
checked; every refusal is a 400 ``invalid_request`` naming the parameter.  Unknown query parameters are
ignored.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator
from starlette.requests import Request
from starlette.responses import Response

from inhouse.audit.query import search, status_range, verify
from inhouse.errors import ErrorCode, InhouseError
from inhouse.keys.store import KeyLimits, KeyNameError, KeyStore
from inhouse.server.body import read_model
from inhouse.server.call import call_of
from inhouse.server.context import context_of
from inhouse.server.probes import DRAINING, model_state
from inhouse.server.render import json_response
from inhouse.storage.database import Database

__all__ = ["audit_search", "audit_verify", "create_key", "list_keys", "list_models", "revoke_key", "rotate_key",
           "show_key"]


_INT32 = 2**31 - 1  # the rpm, tpm and max_concurrency columns are 32-bit
_LIMIT_MAX = 10_000  # audit rows per page
_ModelName = Annotated[StrictStr, Field(min_length=1, max_length=200)]


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: StrictStr = Field(min_length=1, max_length=200)
    admin: StrictBool = False
    models: list[_ModelName] | None = None  # [] is a key that may use no model
    rpm: StrictInt | None = Field(default=None, ge=1, le=_INT32)
    tpm: StrictInt | None = Field(default=None, ge=1, le=_INT32)
    max_concurrency: StrictInt | None = Field(default=None, ge=1, le=_INT32)
    token_budget: StrictInt | None = Field(default=None, ge=1, le=2**53)
    budget_period: Literal["day", "month"] | None = None
    expires_at: StrictFloat | None = None  # unix seconds; strict floats take JSON integers too

    @field_validator("expires_at")
    @classmethod
    def _in_the_future(cls, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and value > time.time()):
            raise ValueError("expires_at must be a time in the future (unix seconds)")
        return value


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
    try:
        key, secret = await asyncio.to_thread(keys.create, body.name, admin=body.admin, models=body.models,
                                              limits=limits, expires_at=body.expires_at)
    except KeyNameError as exc:  # taken by an active key, or shaped like a key id
        raise InhouseError(ErrorCode.INVALID_REQUEST, str(exc), param="name") from None
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
    """A finite number of unix seconds, or None if the parameter is absent or empty."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise InhouseError(ErrorCode.INVALID_REQUEST, f"{name} must be a finite number (unix seconds)", param=name)
    return value


def _limit(request: Request, default: int = 100) -> int:
    raw = request.query_params.get("limit")
    if raw is None or raw == "":
        return default
    if re.fullmatch(r"[0-9]{1,6}", raw) is None or not 1 <= int(raw) <= _LIMIT_MAX:
        raise InhouseError(ErrorCode.INVALID_REQUEST, f"limit must be an integer from 1 to {_LIMIT_MAX}",
                           param="limit")
    return int(raw)


def _status(request: Request) -> tuple[int, int] | None:
    raw = request.query_params.get("status")
    if raw is None or raw.strip() == "":
        return None
    try:
        return status_range(raw)
    except ValueError as exc:
        raise InhouseError(ErrorCode.INVALID_REQUEST, str(exc), param="status") from None


async def audit_search(request: Request) -> Response:
    _, db = _admin(request)
    q = request.query_params
    since, until, limit = _number(request, "since"), _number(request, "until"), _limit(request)
    rows = await asyncio.to_thread(search, db, since=since, until=until, key=q.get("key"), model=q.get("model"),
                                   status=_status(request), limit=limit)
    return json_response({"object": "list", "data": rows, "at": time.time()})


async def audit_verify(request: Request) -> Response:
    _, db = _admin(request)
    result = await asyncio.to_thread(verify, db)
    return json_response({"ok": result.ok, "rows": result.rows, "problem": result.problem})


async def list_models(request: Request) -> Response:
    """Every served model's state and its deployments', whatever the admin key's model list (auth off: open)."""
    ctx = context_of(request)
    if ctx.keys is not None:
        _admin(request)
    registry, draining = ctx.registry, ctx.drain.draining
    data = []
    for name in registry.names():
        deployments = registry.find(name)
        entries = []
        for d in deployments:
            stats = d.engine.stats()
            entry: dict[str, Any] = {"name": d.label, "engine": d.engine.info.kind,
                                     "state": DRAINING if draining and stats.state.value == "ready"
                                     else stats.state.value,
                                     "alive": stats.alive, "healthy": d.route.healthy, "circuit": d.route.circuit,
                                     "in_flight": d.route.outstanding, "running": stats.running,
                                     "waiting": stats.waiting, "weight": d.spec.weight}
            if error := registry.load_error(d) or d.route.health_error:
                entry["error"] = error
            entries.append(entry)
        data.append({"id": name, "object": "model", "state": model_state(deployments, draining),
                     "deployments": entries})
    return json_response({"object": "list", "draining": draining, "in_flight": ctx.drain.in_flight, "data": data})
