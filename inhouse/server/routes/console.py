"""``/console``: the web console's static files (shipped inside the package), and ``GET /metrics/models``,
the per-model live numbers it shows, as JSON.

The console is a static page that calls the public and admin APIs like any client, with a key the user
pastes; serving its files, and ``server.json`` (whether the server asks for keys), needs no key (they hold no
data).  ``/metrics/models`` is public exactly when
``/metrics`` is (``metrics_public``).
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from inhouse.metrics import Metrics
from inhouse.metrics.summary import model_summary
from inhouse.server.render import json_response

__all__ = ["CONSOLE_PATH", "HEADERS", "METRICS_MODELS_PATH", "STATIC_DIR", "console_routes"]

# The page may load and call nothing but its own origin (a browser-enforced "no internet"), may not be framed,
# and sends no referrer; the key it holds never leaves the tab but for this server.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
CONSOLE_PATH = "/console"
METRICS_MODELS_PATH = "/metrics/models"
STATIC_DIR = Path(__file__).resolve().parent.parent.parent / "console" / "static"


class _ConsoleFiles(StaticFiles):
    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        return response


def console_routes(metrics: Metrics, keys_on: bool) -> list[BaseRoute]:
    async def to_index(request: Request) -> Response:
        return RedirectResponse(CONSOLE_PATH + "/", status_code=307)

    async def server(request: Request) -> Response:
        """What the page needs before a key: whether the server asks for one (so it need not probe an API
        route without a key, which would leave a refused call in the audit log at every page load)."""
        return json_response({"auth": "keys" if keys_on else "none"}, headers=HEADERS)

    async def numbers(request: Request) -> Response:
        return json_response(model_summary(metrics))

    return [Route(CONSOLE_PATH, to_index, methods=["GET"]),
            Route(CONSOLE_PATH + "/server.json", server, methods=["GET"]),
            Mount(CONSOLE_PATH, app=_ConsoleFiles(directory=STATIC_DIR, html=True), name="console"),
            Route(METRICS_MODELS_PATH, numbers, methods=["GET"])]
