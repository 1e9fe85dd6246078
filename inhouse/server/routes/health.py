"""``GET /health`` (liveness, with engine state) and ``GET /ready`` (503 until every model is loaded, and while
the server drains).  The rules are in ``probes.py``: ``/health`` is 503 with ``status: "unhealthy"`` and the
``problems`` when an engine loop or the audit writer died or is stuck."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from inhouse.engine.base import Capability
from inhouse.server.context import context_of
from inhouse.server.probes import liveness_problems
from inhouse.server.render import json_response

__all__ = ["health", "ready"]

ENCODING = frozenset({Capability.EMBEDDINGS, Capability.RERANK})


async def health(request: Request) -> Response:
    ctx = context_of(request)
    registry = ctx.registry
    models = {}
    for name in registry.names():
        deployments = registry.deployments(name)
        entries = []
        for deployment in deployments:
            stats = deployment.engine.stats()
            entry: dict[str, Any] = {"deployment": deployment.label, "state": stats.state.value,
                                     "running": stats.running, "waiting": stats.waiting,
                                     "kv_cache_tokens": stats.kv_cache_tokens,
                                     "kv_cache_usage": round(stats.kv_cache_usage, 4),
                                     "healthy": deployment.route.healthy, "circuit": deployment.route.circuit,
                                     "in_flight": deployment.route.outstanding, "alive": stats.alive}
            if deployment.engine.info.capabilities & ENCODING:
                entry |= {"batches": stats.batches, "batched_inputs": stats.batched_inputs,
                          "max_batch": stats.max_batch}
            error = registry.load_error(deployment)
            if error:
                entry["error"] = error
            if deployment.route.health_error is not None:
                entry["health_error"] = deployment.route.health_error
            entries.append(entry)
        # the model's own line is its first deployment's (one deployment: exactly that), plus the list
        models[name] = {**entries[0], "deployments": entries}
    problems = liveness_problems(registry, ctx.audit, ctx.settings.audit_stall_seconds)
    if problems:
        return json_response({"status": "unhealthy", "problems": problems, "models": models}, status=503)
    return json_response({"status": "ok", "models": models})


async def ready(request: Request) -> Response:
    ctx = context_of(request)
    registry = ctx.registry
    is_ready = registry.ready() and not ctx.drain.draining
    status = "draining" if ctx.drain.draining else "ready" if is_ready else "loading"
    body = {"status": status,
            "models": {d.label: d.engine.state.value for d in registry.all()}}
    return json_response(body, status=200 if is_ready else 503)
