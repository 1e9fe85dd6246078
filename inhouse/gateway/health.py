"""HealthMonitor: active health checks of upstream deployments.

Owns one loop that probes every upstream deployment (``GET {base_url}/models``, or a 1-token completion
with ``health_check: completion``) each interval and marks
it up or down; the router skips deployments marked down.  Local engines report their own state and are
not probed.  The loop reads like its job: sleep, probe all at once, record transitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from inhouse.config import RoutingSettings
from inhouse.gateway.registry import Deployment, ModelRegistry

__all__ = ["HealthMonitor"]

log = logging.getLogger("inhouse.health")


class HealthMonitor:
    def __init__(self, registry: ModelRegistry, routing: RoutingSettings) -> None:
        self._routing = routing
        self._upstreams = [d for d in registry.all() if hasattr(d.engine, "probe")]  # local engines: not probed
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._upstreams:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._routing.health_interval_seconds)
            results = await asyncio.gather(*(self._probe(d) for d in self._upstreams))
            for deployment, healthy in zip(self._upstreams, results, strict=True):
                if healthy != deployment.route.healthy:
                    log.warning("deployment %s of %s is %s", deployment.label, deployment.name,
                                "up again" if healthy else "DOWN (health check failed)")
                deployment.route.healthy = healthy

    async def _probe(self, deployment: Deployment) -> bool:
        probe = getattr(deployment.engine, "probe")  # noqa: B009  (upstream engines only)
        return bool(await probe(self._routing.health_timeout_seconds, self._routing.health_check))
