"""The app factory: builds the ASGI app from already-built parts.  No module globals."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Route

from inhouse.config import Settings
from inhouse.gateway.health import HealthMonitor
from inhouse.gateway.registry import ModelRegistry
from inhouse.gateway.router import Router
from inhouse.gateway.swap import Swapper
from inhouse.metrics import GpuCollector, LiveCollector, Metrics
from inhouse.server.access import AccessMiddleware, AccessParts
from inhouse.server.context import ServerContext
from inhouse.server.drain import Drain
from inhouse.server.errors import EXCEPTION_HANDLERS
from inhouse.server.hangup import reload_on_sighup
from inhouse.server.openapi import OPENAPI_PATH, build_openapi, openapi_route
from inhouse.server.routes import adapters, admin, swaps
from inhouse.server.routes.chat import chat_completions
from inhouse.server.routes.completions import completions
from inhouse.server.routes.console import CONSOLE_PATH, METRICS_MODELS_PATH, console_routes
from inhouse.server.routes.embeddings import embeddings
from inhouse.server.routes.health import health, ready
from inhouse.server.routes.metrics import metrics_route
from inhouse.server.routes.models import get_model, list_models
from inhouse.server.routes.rerank import rerank
from inhouse.server.sinks import MetricsSink, RouteTemplates, sinks_for

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
        Route("/admin/models/{name:path}/swap", swaps.swap_model, methods=["POST"]),
        Route("/admin/models/{name:path}/rollback", swaps.rollback_model, methods=["POST"]),
        Route("/admin/models/{name:path}", swaps.model_status, methods=["GET"]),
        Route("/admin/reload", swaps.reload_config, methods=["POST"]),
        Route("/admin/models", admin.list_models, methods=["GET"]),
        Route("/admin/adapters", adapters.list_adapters, methods=["GET"]),
        Route("/admin/adapters", adapters.load_adapter, methods=["POST"]),
        Route("/admin/adapters/{name:path}", adapters.unload_adapter, methods=["DELETE"]),
    ]
    return routes


def create_app(settings: Settings, registry: ModelRegistry, router: Router, health: HealthMonitor,
               access: AccessParts | None = None, metrics: Metrics | None = None, swapper: Swapper | None = None,
               reload: Callable[[], Settings] | None = None, drain: Drain | None = None) -> Starlette:
    """The app over already-built parts; its lifespan starts them (loading, health checks, audit) and closes
    them.  Without ``access`` (or with its parts None): no keys, an in-memory limiter, no audit log.  Without
    ``metrics``, a fresh set (the router then reports no retries or fallbacks: pass the one it was built with)."""
    access = access or AccessParts()
    metrics = metrics or Metrics(settings.metrics)
    drain = drain or Drain(settings.drain_seconds)
    keys, limiter, audit = access.keys, access.limiter, access.audit

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if audit is not None:
            audit.start()
        registry.start_loading()
        health.start()
        unhook = reload_on_sighup(swapper, reload) if swapper is not None and reload is not None else None
        try:
            yield
        finally:
            if unhook is not None:
                unhook()
            await health.stop()
            await registry.close()
            await limiter.close()
            if audit is not None:
                audit.close()

    public = {"/health", "/ready", OPENAPI_PATH} | ({"/metrics"} if settings.metrics_public else set())
    public |= {CONSOLE_PATH} | ({METRICS_MODELS_PATH} if settings.metrics_public else set())
    routes = [*_routes(), openapi_route(build_openapi(settings.models[0].name if settings.models else None,
                                                      settings.metrics_public)),
              metrics_route(metrics)]
    metrics.register(LiveCollector(registry, audit))
    gpus = GpuCollector()
    if gpus.present:
        metrics.register(gpus)
    metrics.expect(registry.all())
    served = [*routes, *console_routes(metrics, keys_on=keys is not None)]
    counting = MetricsSink(metrics, RouteTemplates(getattr(r, "path", "") for r in served),
                           lambda name: bool(registry.find(name)))
    sinks = sinks_for(audit, counting, metrics) + ((swapper.observe,) if swapper is not None else ())
    middleware = Middleware(AccessMiddleware, keys=keys, limiter=limiter, sinks=sinks,
                            public_paths=frozenset(public), keep_text=settings.audit.text != "off", drain=drain,
                            public_prefixes=(CONSOLE_PATH + "/",))
    app = Starlette(routes=served, exception_handlers=EXCEPTION_HANDLERS,
                    lifespan=lifespan, middleware=[middleware])
    app.state.inhouse = ServerContext(settings=settings, registry=registry, router=router,
                                      keys=keys, db=access.db, swapper=swapper, reload=reload, drain=drain,
                                      audit=audit)
    return app
