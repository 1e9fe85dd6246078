"""``/admin/adapters``: load, unload and list LoRA adapter models at runtime (docs/lora.md).

Thin: parse, call ``inhouse.gateway.adapters.Adapters``, render.  Admin keys only (with ``auth: none``, anyone
on the network: a lab).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictStr
from starlette.requests import Request
from starlette.responses import Response

from inhouse.errors import ErrorCode, InhouseError
from inhouse.gateway.adapters import Adapters
from inhouse.server.body import read_model
from inhouse.server.call import call_of
from inhouse.server.context import context_of
from inhouse.server.render import json_response

__all__ = ["list_adapters", "load_adapter", "unload_adapter"]


class AdapterLoad(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: StrictStr = Field(min_length=1, max_length=200)
    base: StrictStr = Field(min_length=1, max_length=200)
    path: StrictStr | None = Field(default=None, min_length=1, max_length=4096)  # a PEFT dir (local bases)
    upstream_model: StrictStr | None = Field(default=None, min_length=1, max_length=200)  # upstream bases


def _adapters(request: Request) -> Adapters:
    ctx = context_of(request)
    call = call_of(request)
    if ctx.keys is not None and (call is None or call.key is None or not call.key.admin):
        raise InhouseError(ErrorCode.ADMIN_REQUIRED, "this endpoint needs an admin API key")
    return Adapters(ctx.registry)


async def list_adapters(request: Request) -> Response:
    return json_response({"object": "list", "data": _adapters(request).list()})


async def load_adapter(request: Request) -> Response:
    adapters = _adapters(request)
    body = await read_model(request, AdapterLoad, 64 * 1024)
    return json_response(await adapters.load(body.name, body.base, body.path, body.upstream_model))


async def unload_adapter(request: Request) -> Response:
    return json_response(await _adapters(request).unload(request.path_params["name"]))
