"""The app factory: builds the ASGI app from already-built parts.  No module globals."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Route

from inhouse.config import Settings
from inhouse.gateway.health import HealthMonitor
from inhouse.gateway.registry import ModelRegistry
from inhouse.gateway.router import Router
from inhouse.server.access import AccessMiddleware, AccessParts
from inhouse.server.context import ServerContext
from inhouse.server.drain import Drain
from inhouse.server.errors import EXCEPTION_HANDLERS
from inhouse.server.openapi import OPENAPI_PATH, build_openapi, openapi_route
from inhouse.server.routes import admin
from inhouse.server.routes.chat import chat_completions
from inhouse.server.routes.completions import completions
from inhouse.server.routes.embeddings import embeddings
from inhouse.server.routes.health import health, ready
from inhouse.server.routes.models import get_model, list_models
from inhouse.server.routes.rerank import rerank
from inhouse.server.sinks import sinks_for

__all__ = ["create_app"]


def _routes() -> list[Route]:
    api = [
        ("/chat/completions", chat_completions, ["POST"]),
        ("/completions", completions, ["POST"]),
        ("/embeddings", embeddings, ["POST"]),
        ("/rerank", rerank, ["POST"]),
        ("/models", list_models, ["GET"]),
        ("/models/{model_id:path}", get_model, ["GET"]),
    ]
    routes = []
    # Dify users type the base URL with or without /v1 and Dify adds nothing: serve both.
    for prefix in ("/v1", ""):
        routes += [Route(prefix + path, endpoint, methods=methods) for path, endpoint, methods in api]
    routes.append(Route("/v2/rerank", rerank, methods=["POST"]))  # Cohere v2 clients; same body and answer
    routes += [Route("/health", health, methods=["GET"]), Route("/ready", ready, methods=["GET"])]
    routes += [
        Route("/admin/keys", admin.list_keys, methods=["GET"]),
        Route("/admin/keys", admin.create_key, methods=["POST"]),
        Route("/admin/keys/{key}", admin.show_key, methods=["GET"]),
        Route("/admin/keys/{key}/revoke", admin.revoke_key, methods=["POST"]),
        Route("/admin/keys/{key}/rotate", admin.rotate_key, methods=["POST"]),
        Route("/admin/audit", admin.audit_search, methods=["GET"]),
        Route("/admin/audit/verify", admin.audit_verify, methods=["GET"]),
        Route("/admin/models", admin.list_models, methods=["GET"]),
    ]
    return routes


def create_app(settings: Settings, registry: ModelRegistry, router: Router, health: HealthMonitor,
               access: AccessParts | None = None, drain: Drain | None = None) -> Starlette:
    """The app over already-built parts; its lifespan starts them (loading, health checks, audit) and closes
    them.  Without ``access`` (or with its parts None): no keys, an in-memory limiter, no audit log."""
    access = access or AccessParts()
    drain = drain or Drain(settings.drain_seconds)
    keys, limiter, audit = access.keys, access.limiter, access.audit

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if audit is not None:
            audit.start()
        registry.start_loading()
        health.start()
        try:
            yield
        finally:
            await health.stop()
            await registry.close()
            await limiter.close()
            if audit is not None:
                audit.close()

    public = {"/health", "/ready", OPENAPI_PATH} | ({"/metrics"} if settings.metrics_public else set())
    middleware = Middleware(AccessMiddleware, keys=keys, limiter=limiter, sinks=sinks_for(audit),
                            public_paths=frozenset(public), keep_text=settings.audit.text != "off", drain=drain)
    routes = [*_routes(), openapi_route(build_openapi(settings.models[0].name if settings.models else None))]
    app = Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan,
                    middleware=[middleware])
    app.state.inhouse = ServerContext(settings=settings, registry=registry, router=router,
                                      keys=keys, db=access.db, drain=drain, audit=audit)
    return app
