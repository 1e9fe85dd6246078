"""``GET /metrics``: every ``inhouse_*`` metric in the Prometheus text format.

Public unless ``metrics_public: false``; then any valid API key may scrape (the access middleware checks it,
as for every other API route, and the scrape is a call like any other: audited, counted).
"""

from __future__ import annotations

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from inhouse.metrics import Metrics

__all__ = ["METRICS_PATH", "metrics_route"]

METRICS_PATH = "/metrics"


def metrics_route(metrics: Metrics) -> Route:
    async def scrape(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    return Route(METRICS_PATH, scrape, methods=["GET"])
