"""``GET /v1/models`` and ``GET /v1/models/{id}``."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from inhouse.errors import ErrorCode, InhouseError
from inhouse.gateway.registry import Deployment
from inhouse.protocol.models import model_card, model_list
from inhouse.server.call import call_of
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
    """The models this caller's key may use."""
    registry = context_of(request).registry
    call = call_of(request)
    key = call.key if call is not None else None
    return json_response(model_list([_card(d) for d in registry.all() if key is None or key.allows(d.name)]))


async def get_model(request: Request) -> Response:
    deployment = context_of(request).registry.get(request.path_params["model_id"])
    call = call_of(request)
    if call is not None and call.key is not None and not call.key.allows(deployment.name):
        raise InhouseError(ErrorCode.MODEL_NOT_FOUND, f"The model '{deployment.name}' does not exist", param="model")
    return json_response(_card(deployment))
