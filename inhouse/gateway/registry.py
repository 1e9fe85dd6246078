"""ModelRegistry: public model name → its deployments (local engines or upstream servers), live.

Owns the set of served models and its changes (``replace`` swaps a model's deployments at once, then drains
and closes the old engines), the engines' start and close (once per engine, however many deployments share
it), load errors, and each deployment's routing state (requests in flight, circuit breaker, health).
Knows nothing about HTTP; the router decides which deployment answers.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from inhouse.config import ModelSpec
from inhouse.engine.base import Engine, EngineState, ModelLoadError
from inhouse.errors import ErrorCode, InhouseError
from inhouse.gateway.version import version_of

__all__ = ["Deployment", "ModelRegistry", "RouteState"]

log = logging.getLogger("inhouse.registry")

_DRAIN_POLL_SECONDS = 0.05  # how often a drain looks at the old deployments' in-flight counts


@dataclass
class RouteState:
    """One deployment's standing with the router: load, recent failures, circuit, health."""

    outstanding: int = 0
    failures: deque[float] = field(default_factory=deque)
    open_until: float = 0.0  # circuit open (out of rotation) until then; then one probe request
    probing: bool = False
    healthy: bool = True  # from the health checker (upstreams only)
    health_error: str | None = None  # why the last health check failed, for the operator

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

    def checked(self, reason: str | None) -> None:
        """A health check's verdict: None is healthy, else the reason it is not."""
        self.healthy, self.health_error = reason is None, reason


@dataclass(frozen=True)
class Deployment:
    spec: ModelSpec
    engine: Engine
    created: int
    route: RouteState = field(default_factory=RouteState)
    version: str = ""  # the version label (model card, audit rows); ``of`` and swaps fill it from the spec

    @classmethod
    def new(cls, spec: ModelSpec, engine: Engine) -> Deployment:
        return cls(spec, engine, int(time.time()), version=version_of(spec))

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def label(self) -> str:
        return self.spec.deployment_label


class ModelRegistry:
    """The live set: ``deployments(name)`` always answers with the current set, and ``replace`` swaps a name's
    set at once.  Engines are started and closed here, each exactly once however many deployments share it
    (an engine is held while a live or draining deployment uses it)."""

    def __init__(self, deployments: Iterable[Deployment], drain_seconds: float = 30.0) -> None:
        self._by_name: dict[str, list[Deployment]] = {}
        for deployment in deployments:
            self._by_name.setdefault(deployment.name, []).append(deployment)
        self._drain_seconds = drain_seconds
        self._engines: dict[int, _Held] = {}  # id(engine) → the engine and its start; until it is closed
        self._load_errors: dict[int, str] = {}  # id(engine) → why it failed to start
        self._load_seconds: dict[int, float] = {}  # id(engine) → how long its start took (loaded ones)
        self._canaries: dict[str, tuple[list[Deployment], float]] = {}  # name → (canary set, share of requests)

    @classmethod
    def of(cls, pairs: Iterable[tuple[ModelSpec, Engine]], drain_seconds: float = 30.0) -> ModelRegistry:
        return cls((Deployment.new(spec, engine) for spec, engine in pairs), drain_seconds)

    def serving(self, name: str) -> list[Deployment]:
        """The set a new request of ``name`` goes to: the canary set for its share of requests, else the live set."""
        canary = self._canaries.get(name)
        if canary is not None and random.random() < canary[1]:
            return canary[0]
        return self.find(name)

    def canary(self, name: str) -> list[Deployment]:
        """The model's canary set (empty: no canary running)."""
        return self._canaries.get(name, ([], 0.0))[0]

    async def prepare(self, deployments: list[Deployment]) -> str | None:
        """Start the engines of deployments not serving yet; None when all loaded, else why one did not."""
        await self._started(deployments)
        return next((e for e in (self.load_error(d) for d in deployments) if e is not None), None)

    def start_canary(self, name: str, deployments: list[Deployment], share: float) -> None:
        """Send ``share`` of new requests of ``name`` to ``deployments`` (prepared) until ``end_canary``."""
        self._canaries[name] = (list(deployments), share)

    async def end_canary(self, name: str, promote: bool, drain_seconds: float | None = None) -> None:
        """Promote the canary (it becomes the live set, the old one drains) or drop it (it drains and closes)."""
        deployments, _ = self._canaries.pop(name, ([], 0.0))
        if promote:
            await self.replace(name, deployments, drain_seconds)
        else:
            await self.discard(deployments, drain_seconds)

    async def discard(self, deployments: list[Deployment], drain_seconds: float | None = None) -> None:
        """Close prepared (or canary) deployments that are not serving, after their in-flight requests."""
        await self._retire(deployments, self._drain_seconds if drain_seconds is None else drain_seconds)

    def find(self, name: str) -> list[Deployment]:
        """The model's deployments now; empty when there is no such model (any more)."""
        return self._by_name.get(name, [])

    def deployments(self, name: str) -> list[Deployment]:
        """The model's deployments now, or 404 ``model_not_found``."""
        found = self.find(name)
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
            self._start(deployment)

    async def replace(self, name: str, deployments: Iterable[Deployment], drain_seconds: float | None = None) -> None:
        """Make ``deployments`` the whole set of model ``name`` (none: the model is gone).

        Their engines start first (one already held is reused), while the old set still answers; then the
        set is swapped at once, so the next request goes to the new one.  Requests in flight finish on the
        old engines, which are closed once idle, or at the deadline (``drain_seconds``) regardless; an
        engine that a live deployment still uses stays open.  Returns when the old engines are closed.
        """
        new = list(deployments)
        if any(d.name != name for d in new):
            raise ValueError(f"replace({name!r}, ...) was given deployments of another model")
        await self._started(new)
        old = self._by_name.pop(name, [])
        if new:
            self._by_name[name] = new
        await self._retire(old, self._drain_seconds if drain_seconds is None else drain_seconds)

    async def add(self, deployment: Deployment) -> None:
        """One more deployment for its model (a new model when the name is new), once its engine started."""
        await self._started([deployment])
        self._by_name[deployment.name] = [*self.find(deployment.name), deployment]

    async def remove(self, name: str, drain_seconds: float | None = None) -> None:
        """Stop serving a model: new requests get 404 at once; those in flight finish first (up to the deadline)."""
        self.deployments(name)  # 404 for an unknown name
        await self.replace(name, [], drain_seconds)

    async def _started(self, deployments: list[Deployment]) -> None:
        """Until the deployments' engines finished starting (or failed: a load error, as at start-up)."""
        starting = {self._start(d) for d in deployments}
        if starting:  # asyncio.wait, not gather: a cancelled replace must not cancel a shared engine's start
            await asyncio.wait(starting)

    def _start(self, deployment: Deployment) -> asyncio.Task[None]:
        """The engine's start, begun on its first deployment only."""
        held = self._engines.get(id(deployment.engine))
        if held is None:
            task = asyncio.create_task(self._load(deployment))
            held = self._engines[id(deployment.engine)] = _Held(deployment.engine, task)
        return held.start

    async def _load(self, deployment: Deployment) -> None:
        started = time.monotonic()
        try:
            await deployment.engine.start()
        except ModelLoadError as exc:
            log.error("model %s failed to load: %s", deployment.name, exc)
            self._load_errors[id(deployment.engine)] = str(exc)
            return
        except Exception:
            log.exception("model %s failed to load", deployment.name)
            self._load_errors[id(deployment.engine)] = "the model failed to load; the reason is in the server log"
            return
        self._load_seconds[id(deployment.engine)] = time.monotonic() - started
        log.info("model %s (%s) loaded in %.1f s", deployment.name, deployment.label, time.monotonic() - started)

    async def _retire(self, old: list[Deployment], drain_seconds: float) -> None:
        """Wait until the old deployments have nothing in flight (or the deadline), then close every engine of
        theirs that no live deployment uses."""
        live = self._live_engines()
        leaving = [d for d in old if id(d.engine) not in live]
        deadline = time.monotonic() + drain_seconds
        while any(d.route.outstanding for d in leaving) and time.monotonic() < deadline:
            await asyncio.sleep(_DRAIN_POLL_SECONDS)
        for deployment in leaving:
            if deployment.route.outstanding:
                log.warning("deployment %s of %s: closing with %d requests still in flight after %.0f s",
                            deployment.label, deployment.name, deployment.route.outstanding, drain_seconds)
        live = self._live_engines()  # a replace meanwhile may have taken an engine back
        await asyncio.gather(*(self._close(d.engine) for d in leaving if id(d.engine) not in live))

    def _live_engines(self) -> set[int]:
        canaries = [d for group, _ in self._canaries.values() for d in group]
        return {id(d.engine) for d in [*self.all(), *canaries]}

    async def _close(self, engine: Engine) -> None:
        """Close an engine once: a second call (another deployment that shared it) finds it gone."""
        held = self._engines.pop(id(engine), None)
        if held is None:
            return
        self._load_errors.pop(id(engine), None)
        self._load_seconds.pop(id(engine), None)
        held.start.cancel()
        try:
            await engine.close()
        except Exception:
            log.exception("closing an engine of %s failed", type(engine).__name__)

    def load_error(self, deployment: Deployment) -> str | None:
        """Why a deployment failed to load, in words meant for the operator, or None."""
        return self._load_errors.get(id(deployment.engine))

    def load_seconds(self, deployment: Deployment) -> float | None:
        """How long the deployment's engine took to load, once it has."""
        return self._load_seconds.get(id(deployment.engine))

    async def wait_loaded(self) -> None:
        await asyncio.gather(*(held.start for held in list(self._engines.values())), return_exceptions=True)

    async def close(self) -> None:
        """Close every engine started here and not closed yet, live or draining, each once."""
        await asyncio.gather(*(self._close(held.engine) for held in list(self._engines.values())))


@dataclass(frozen=True)
class _Held:
    engine: Engine
    start: asyncio.Task[None]
