"""The app factory: builds the ASGI app from already-built parts.  No module globals."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.routing import Route

from inhouse.config import Settings
from inhouse.gateway.registry import ModelRegistry
from inhouse.server.context import ServerContext
from inhouse.server.errors import EXCEPTION_HANDLERS
from inhouse.server.routes.chat import chat_completions
from inhouse.server.routes.completions import completions
from inhouse.server.routes.health import health, ready
from inhouse.server.routes.models import get_model, list_models

__all__ = ["create_app"]


def _routes() -> list[Route]:
    api = [
        ("/chat/completions", chat_completions, ["POST"]),
        ("/completions", completions, ["POST"]),
        ("/models", list_models, ["GET"]),
        ("/models/{model_id:path}", get_model, ["GET"]),
    ]
    routes = []
    # Dify users type the base URL with or without /v1 and Dify adds nothing: serve both.
    for prefix in ("/v1", ""):
        routes += [Route(prefix + path, endpoint, methods=methods) for path, endpoint, methods in api]
    routes += [Route("/health", health, methods=["GET"]), Route("/ready", ready, methods=["GET"])]
    return routes


def create_app(settings: Settings, registry: ModelRegistry) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        registry.start_loading()
        try:
            yield
        finally:
            await registry.close()

    app = Starlette(routes=_routes(), exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)  # type: ignore[arg-type]
    app.state.inhouse = ServerContext(settings=settings, registry=registry)
    return app
