"""``GET /v1/models`` and ``GET /v1/models/{id}``."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from inhouse.gateway.registry import Deployment
from inhouse.protocol.models import model_card, model_list
from inhouse.server.context import context_of
from inhouse.server.render import json_response

__all__ = ["get_model", "list_models"]


def _card(deployment: Deployment) -> dict[str, Any]:
    info = deployment.engine.info
    extra: dict[str, Any] = {"engine": info.kind, "status": deployment.engine.state.value}
    if info.context_length:
        extra["max_model_len"] = info.context_length
    return model_card(deployment.name, deployment.created, extra)


async def list_models(request: Request) -> Response:
    registry = context_of(request).registry
    return json_response(model_list([_card(d) for d in registry.all()]))


async def get_model(request: Request) -> Response:
    registry = context_of(request).registry
    return json_response(_card(registry.get(request.path_params["model_id"])))
