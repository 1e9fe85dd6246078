"""``/admin/models/{name}…`` and ``/admin/reload``: health-gated model swaps, canary, rollback, config reload.

Thin: parse the body, call the Swapper, render what it returns.  Admin keys only (with ``auth: none``,
anyone on the network: a lab).  A refused swap is a 409 ``swap_failed`` saying why; the old version keeps
serving.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat
from starlette.requests import Request
from starlette.responses import Response

from inhouse.config import ConfigError
from inhouse.errors import ErrorCode, InhouseError
from inhouse.gateway.swap import Swapper
from inhouse.server.body import read_model
from inhouse.server.call import call_of
from inhouse.server.context import context_of
from inhouse.server.render import json_response

__all__ = ["model_status", "reload_config", "rollback_model", "swap_model"]


class SwapBody(BaseModel):
    """The model-spec fields to change (``path``, ``version``, ``smoke``, ...), and the canary, if any."""

    model_config = ConfigDict(extra="allow")

    canary: StrictFloat | None = Field(default=None, gt=0, lt=1)  # share of new requests for the window
    canary_window_s: StrictFloat | None = Field(default=None, gt=0, le=86400)


def _swapper(request: Request) -> Swapper:
    ctx = context_of(request)
    call = call_of(request)
    if ctx.keys is not None and (call is None or call.key is None or not call.key.admin):
        raise InhouseError(ErrorCode.ADMIN_REQUIRED, "this endpoint needs an admin API key")
    if ctx.swapper is None:
        raise InhouseError(ErrorCode.UNSUPPORTED, "this server does not swap models")
    return ctx.swapper


async def swap_model(request: Request) -> Response:
    swapper = _swapper(request)
    body = await read_model(request, SwapBody, 64 * 1024)
    changes: dict[str, Any] = dict(body.model_extra or {})
    for fixed in ("name", "engine", "deployment"):
        if fixed in changes:
            raise InhouseError(ErrorCode.INVALID_REQUEST, f"a swap cannot change {fixed!r}", param=fixed)
    if not changes:
        raise InhouseError(ErrorCode.INVALID_REQUEST, "say what to change, e.g. {\"path\": \"/models/new\"}")
    result = await swapper.swap(request.path_params["name"], changes, body.canary, body.canary_window_s)
    return json_response(result)


async def rollback_model(request: Request) -> Response:
    return json_response(await _swapper(request).rollback(request.path_params["name"]))


async def model_status(request: Request) -> Response:
    return json_response({"object": "model.status", **_swapper(request).status(request.path_params["name"])})


async def reload_config(request: Request) -> Response:
    swapper = _swapper(request)
    reload = context_of(request).reload
    if reload is None:
        raise InhouseError(ErrorCode.UNSUPPORTED, "this server has no config file to re-read")
    try:
        settings = await asyncio.to_thread(reload)
    except ConfigError as exc:
        raise InhouseError(ErrorCode.INVALID_REQUEST, f"the config file was refused, nothing changed: {exc}") from None
    return json_response({"object": "reload", **await swapper.reload(settings)})
