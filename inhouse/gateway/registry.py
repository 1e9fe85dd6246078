"""ModelRegistry: public model name → its deployments (local engines or upstream servers).

Owns the set of served models, their start/stop, load errors, and each deployment's routing state
(requests in flight, circuit breaker, health).  Knows nothing about HTTP; the router decides which
deployment answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from inhouse.config import ModelSpec
from inhouse.engine.base import Engine, EngineState, ModelLoadError
from inhouse.errors import ErrorCode, InhouseError

__all__ = ["Deployment", "ModelRegistry", "RouteState"]

log = logging.getLogger("inhouse.registry")


@dataclass
class RouteState:
    """One deployment's standing with the router: load, recent failures, circuit, health."""

    outstanding: int = 0
    failures: deque[float] = field(default_factory=deque)
    open_until: float = 0.0  # circuit open (out of rotation) until then; then one probe request
    probing: bool = False
    healthy: bool = True  # from the health checker (upstreams only)

    @property
    def circuit(self) -> str:
        if self.open_until == 0.0:
            return "closed"
        return "half_open" if time.monotonic() >= self.open_until else "open"

    def available(self) -> bool:
        """May take a request now: healthy, and the circuit closed or cooled off with no probe in flight."""
        if not self.healthy:
            return False
        if self.open_until == 0.0:
            return True
        return time.monotonic() >= self.open_until and not self.probing

    def taken(self) -> None:
        """The router chose this deployment: after a cooldown, that request is the one probe."""
        if self.open_until != 0.0:
            self.probing = True

    def failed(self, threshold: int, window: float, cooldown: float) -> bool:
        """Count a failure; True when it opened the circuit."""
        now = time.monotonic()
        if self.probing:  # the probe failed: stay out for another cooldown
            self.probing, self.open_until = False, now + cooldown
            return True
        self.failures.append(now)
        while self.failures and self.failures[0] < now - window:
            self.failures.popleft()
        if len(self.failures) >= threshold:
            self.failures.clear()
            self.open_until = now + cooldown
            return True
        return False

    def succeeded(self) -> None:
        self.failures.clear()
        self.open_until, self.probing = 0.0, False


@dataclass(frozen=True)
class Deployment:
    spec: ModelSpec
    engine: Engine
    created: int
    route: RouteState = field(default_factory=RouteState)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def label(self) -> str:
        return self.spec.deployment_label


class ModelRegistry:
    def __init__(self, deployments: Iterable[Deployment]) -> None:
        self._by_name: dict[str, list[Deployment]] = {}
        for deployment in deployments:
            self._by_name.setdefault(deployment.name, []).append(deployment)
        self._loading: list[asyncio.Task[None]] = []
        self._load_errors: dict[str, str] = {}

    @classmethod
    def of(cls, pairs: Iterable[tuple[ModelSpec, Engine]]) -> ModelRegistry:
        now = int(time.time())
        return cls(Deployment(spec, engine, now) for spec, engine in pairs)

    def deployments(self, name: str) -> list[Deployment]:
        found = self._by_name.get(name)
        if not found:
            raise InhouseError(
                ErrorCode.MODEL_NOT_FOUND,
                f"The model '{name}' does not exist. Available models: {', '.join(sorted(self._by_name))}",
                param="model",
            )
        return found

    def get(self, name: str) -> Deployment:
        """The first deployment of a model (its card; single-deployment models)."""
        return self.deployments(name)[0]

    def names(self) -> list[str]:
        return list(self._by_name)

    def all(self) -> list[Deployment]:
        return [d for group in self._by_name.values() for d in group]

    def ready(self) -> bool:
        """Every model has a deployment that is loaded."""
        return all(any(d.engine.state is EngineState.READY for d in group) for group in self._by_name.values())

    def start_loading(self) -> None:
        """Load every model in the background; the server answers (503 for loading models) meanwhile."""
        for deployment in self.all():
            self._loading.append(asyncio.create_task(self._load(deployment)))

    async def _load(self, deployment: Deployment) -> None:
        started = time.monotonic()
        try:
            await deployment.engine.start()
        except ModelLoadError as exc:
            log.error("model %s failed to load: %s", deployment.name, exc)
            self._load_errors[deployment.label] = str(exc)
            return
        except Exception:
            log.exception("model %s failed to load", deployment.name)
            self._load_errors[deployment.label] = "the model failed to load; the reason is in the server log"
            return
        log.info("model %s (%s) loaded in %.1f s", deployment.name, deployment.label, time.monotonic() - started)

    def load_error(self, deployment: Deployment) -> str | None:
        """Why a deployment failed to load, in words meant for the operator, or None."""
        return self._load_errors.get(deployment.label)

    async def wait_loaded(self) -> None:
        await asyncio.gather(*self._loading, return_exceptions=True)

    async def close(self) -> None:
        for task in self._loading:
            task.cancel()
        await asyncio.gather(*(d.engine.close() for d in self.all()), return_exceptions=True)
