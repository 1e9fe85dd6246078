"""``GET /v1/models`` and ``GET /v1/models/{id}``."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from inhouse.engine.base import Capability, EngineState
from inhouse.errors import ErrorCode, InhouseError
from inhouse.gateway.registry import Deployment
from inhouse.protocol.models import model_card, model_list
from inhouse.server.call import call_of
from inhouse.server.context import context_of
from inhouse.server.probes import model_state
from inhouse.server.render import json_response

__all__ = ["get_model", "list_models"]


def _card(deployments: list[Deployment], draining: bool = False) -> dict[str, Any]:
    """One card per model name; its deployments (several for a balanced or upstream model) inside.  ``state``
    is the model's: loading, ready, draining (the server stops) or failed."""
    first = deployments[0]
    info = first.engine.info
    ready = [d for d in deployments if d.engine.state is EngineState.READY]
    extra: dict[str, Any] = {"engine": info.kind, "status": (ready[0] if ready else first).engine.state.value,
                             "state": model_state(deployments, draining),
                             "capabilities": sorted(c.value for c in info.capabilities)}
    if info.context_length:
        extra["max_model_len"] = info.context_length
    if info.embedding_dimensions:
        extra["embedding_dimensions"] = info.embedding_dimensions
    if info.matryoshka_dimensions is not None and Capability.EMBEDDINGS in info.capabilities:
        extra["matryoshka_dimensions"] = list(info.matryoshka_dimensions)
    if info.rerank_method is not None and Capability.RERANK in info.capabilities:
        extra["rerank_method"] = info.rerank_method
    if first.spec.fallbacks:
        extra["fallbacks"] = list(first.spec.fallbacks)
    extra["deployments"] = [{"name": d.label, "engine": d.engine.info.kind, "status": d.engine.state.value,
                             "healthy": d.route.healthy, "circuit": d.route.circuit,
                             "in_flight": d.route.outstanding, "weight": d.spec.weight, "version": d.version}
                            for d in deployments]
    extra["version"] = ",".join(sorted({d.version for d in deployments}))
    return model_card(first.name, first.created, extra)


async def list_models(request: Request) -> Response:
    """The models this caller's key may use."""
    ctx = context_of(request)
    registry = ctx.registry
    call = call_of(request)
    key = call.key if call is not None else None
    return json_response(model_list([_card(registry.deployments(name), ctx.drain.draining) for name in registry.names()
                                     if key is None or key.allows(name)]))


async def get_model(request: Request) -> Response:
    name = request.path_params["model_id"]
    ctx = context_of(request)
    deployments = ctx.registry.deployments(name)
    call = call_of(request)
    if call is not None and call.key is not None and not call.key.allows(name):
        raise InhouseError(ErrorCode.MODEL_NOT_FOUND, f"The model '{name}' does not exist", param="model")
    return json_response(_card(deployments, ctx.drain.draining))
