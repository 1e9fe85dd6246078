"""HealthMonitor: active health checks of the deployments that can be probed (upstreams).

Owns one loop that, each interval, reads the registry's current deployments, probes every engine that
declares the ``HealthProbe`` surface (``GET {base_url}/models`` must list the model id it will ask for, or
with ``health_check: completion`` a 1-token completion must answer) and marks its deployments up or down
with the reason; the router skips deployments marked down.  Local engines report their own state and are
not probed.  The loop reads like its job: sleep, probe all at once, record transitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from inhouse.config import RoutingSettings
from inhouse.gateway.registry import Deployment, ModelRegistry

__all__ = ["HealthMonitor", "HealthProbe"]

log = logging.getLogger("inhouse.health")


@runtime_checkable
class HealthProbe(Protocol):
    """An engine that can be checked from outside (an upstream server)."""

    async def probe(self, timeout: float, kind: str) -> str | None:
        """One check of ``kind`` (``models`` or ``completion``) within ``timeout`` seconds: None when healthy,
        else the reason, in words for the operator."""


if TYPE_CHECKING:  # mypy holds the upstream engine to the surface it declares (the engine cannot import this)
    from inhouse.engine.upstream import UpstreamEngine

    def _upstream_is_probed(engine: UpstreamEngine) -> HealthProbe:
        return engine


class HealthMonitor:
    def __init__(self, registry: ModelRegistry, routing: RoutingSettings) -> None:
        self._registry = registry
        self._routing = routing
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._routing.health_interval_seconds)
            await self.check()

    async def check(self) -> None:
        """One round: probe every probeable engine now in the registry once, then mark its deployments."""
        deployments = self._registry.all()
        engines = {id(d.engine): d.engine for d in deployments if isinstance(d.engine, HealthProbe)}  # shared: once
        reasons = await asyncio.gather(*(self._probe(engine) for engine in engines.values()))
        verdicts = dict(zip(engines, reasons, strict=True))
        for deployment in deployments:
            if id(deployment.engine) in verdicts:
                self._record(deployment, verdicts[id(deployment.engine)])

    async def _probe(self, engine: HealthProbe) -> str | None:
        return await engine.probe(self._routing.health_timeout_seconds, self._routing.health_check)

    @staticmethod
    def _record(deployment: Deployment, reason: str | None) -> None:
        if (reason is None) != deployment.route.healthy:
            if reason is None:
                log.warning("deployment %s of %s is up again", deployment.label, deployment.name)
            else:
                log.warning("deployment %s of %s is DOWN: %s", deployment.label, deployment.name, reason)
        deployment.route.checked(reason)
