"""Router: which deployment answers a request, and what to try when one fails.

Owns the retry and fallback loop and the in-flight counts, for any operation: the caller passes an
``attempt`` that does its work on one deployment (admit generations, embed, ...) and gets back a
``Routed``: the deployment, the attempt's result, and ``release()`` to call when that work is over.  It
knows no operation, no request and no Generation.

For the asked model, then each of its fallbacks in order, it picks the available deployment with the
fewest requests in flight per unit of weight (from the registry's current set, read on every try) and
runs the attempt.  An upstream that fails before the first byte (unreachable, 429/5xx, a stall) counts
against that deployment's circuit breaker and is retried after a jittered backoff, at most ``retries``
more times per model; a local engine that is loading or full sends the request to another deployment
if there is one, else on to the fallbacks, else its own 429/503 is the answer at once.  Errors that are
the request's own (400, context length) are raised at once.  After the first byte nothing is retried:
the stream ends with an error event instead.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from inhouse.config import RoutingSettings
from inhouse.errors import ErrorCode, InhouseError
from inhouse.gateway.registry import Deployment, ModelRegistry, RouteState

__all__ = ["Attempt", "Routed", "Router", "RouterEvents"]

T = TypeVar("T")

Attempt = Callable[[Deployment], Awaitable[T]]
"""Does the operation on the chosen deployment; raises InhouseError when that deployment cannot."""

log = logging.getLogger("inhouse.router")

# Failures worth trying elsewhere; the first is also the deployment's fault (counts for its circuit).
_DEPLOYMENT_FAULTS = {ErrorCode.UPSTREAM_UNAVAILABLE}
_TRY_ELSEWHERE = {ErrorCode.UPSTREAM_UNAVAILABLE, ErrorCode.QUEUE_FULL, ErrorCode.MODEL_LOADING,
                  ErrorCode.MODEL_UNAVAILABLE}


class RouterEvents(Protocol):
    """What the router tells whoever counts (the metrics): each a cheap, synchronous call."""

    def retried(self, model: str, deployment: str, code: ErrorCode) -> None:
        """A try of ``deployment`` failed with ``code`` and the router is trying again (there or elsewhere)."""

    def fell_back(self, model: str, fallback: str) -> None:
        """Every deployment of ``model`` failed; ``fallback`` answered."""

    def circuit_opened(self, model: str, deployment: str) -> None: ...

    def admitted(self, model: str, waited_seconds: float) -> None:
        """A deployment admitted the call ``waited_seconds`` after the router took it."""


class _NoEvents:
    def retried(self, model: str, deployment: str, code: ErrorCode) -> None:
        pass

    def fell_back(self, model: str, fallback: str) -> None:
        pass

    def circuit_opened(self, model: str, deployment: str) -> None:
        pass

    def admitted(self, model: str, waited_seconds: float) -> None:
        pass


class _InFlight:
    """One request counted in flight on a deployment, from the pick until ``end()`` (once; later calls do nothing)."""

    def __init__(self, route: RouteState) -> None:
        self._route: RouteState | None = route
        route.outstanding += 1

    def end(self) -> None:
        if self._route is not None:
            self._route.outstanding -= 1
            self._route = None


@dataclass(frozen=True)
class Routed(Generic[T]):
    """Who answered and what the attempt returned.  The request stays counted in flight on the deployment
    (balancing, and the registry's drain before it closes a replaced engine) until ``release()``."""

    deployment: Deployment
    result: T
    _in_flight: _InFlight = field(repr=False)

    @property
    def model(self) -> str:
        return self.deployment.name

    def release(self) -> None:
        """The operation's work on the deployment is over (finished, failed or aborted); idempotent."""
        self._in_flight.end()


class Router:
    def __init__(self, registry: ModelRegistry, routing: RoutingSettings, events: RouterEvents | None = None) -> None:
        self._registry = registry
        self._routing = routing
        self._events: RouterEvents = events or _NoEvents()

    async def call(self, model: str, attempt: Attempt[T]) -> Routed[T]:
        """Run ``attempt`` on a deployment of ``model`` (or of its fallbacks), retrying before the first byte.
        The caller must ``release()`` the answer once the operation's work is over."""
        first = self._registry.deployments(model)  # 404 for an unknown model, before anything else
        errors: list[InhouseError] = []
        started = time.monotonic()
        for name in (model, *first[0].spec.fallbacks):
            routed = await self._try_model(name, attempt, errors, started)
            if routed is not None:
                if name != model:
                    log.warning("model %s: every deployment failed; answered by fallback %s", model, name)
                    self._events.fell_back(model, name)
                return routed
        raise _exhausted(model, errors)

    async def _try_model(self, name: str, attempt: Attempt[T], errors: list[InhouseError],
                         started: float) -> Routed[T] | None:
        tried: set[str] = set()
        failed: tuple[str, ErrorCode] | None = None  # the try before this one, which failed
        for retry in range(1 + self._routing.retries):
            deployments = self._registry.serving(name)  # now: a replace may have swapped it, a canary share it
            deployment = self._pick(deployments, tried)
            if deployment is None:
                return None
            if failed is not None:
                self._events.retried(name, *failed)
            tried.add(deployment.label)
            try:
                return await self._attempt(deployment, attempt, started)
            except InhouseError as exc:
                if exc.code not in _TRY_ELSEWHERE:
                    raise
                errors.append(exc)
                failed = (deployment.label, exc.code)
                if exc.code in _DEPLOYMENT_FAULTS:
                    r = self._routing
                    if deployment.route.failed(r.circuit_failures, r.circuit_window_seconds, r.cooldown_seconds):
                        self._events.circuit_opened(name, deployment.label)
                        log.warning("deployment %s of %s: circuit open for %.0f s after repeated failures",
                                    deployment.label, name, r.cooldown_seconds)
                elif all(d.label in tried for d in deployments):
                    return None  # full or loading, and no other deployment: refuse now, no backoff
            if retry < self._routing.retries:
                await asyncio.sleep(self._routing.backoff_seconds * 2 ** retry * random.uniform(0.5, 1.5))
        return None

    def _pick(self, deployments: list[Deployment], tried: set[str]) -> Deployment | None:
        """Least outstanding requests per unit of weight; untried deployments first."""
        fresh = [d for d in deployments if d.label not in tried]
        for pool in (fresh, deployments):
            candidates = [d for d in pool if d.route.available()]
            if candidates:
                lowest = min((d.route.outstanding + 1) / d.spec.weight for d in candidates)
                best = [d for d in candidates if (d.route.outstanding + 1) / d.spec.weight == lowest]
                chosen = random.choice(best)
                chosen.route.taken()
                return chosen
        return None

    async def _attempt(self, deployment: Deployment, attempt: Attempt[T], started: float) -> Routed[T]:
        """Counted in flight from here; a failed attempt ends its count, a successful one hands it to the caller."""
        in_flight = _InFlight(deployment.route)
        waited = time.monotonic() - started
        try:
            result = await attempt(deployment)
        except BaseException as exc:
            in_flight.end()
            if not (isinstance(exc, InhouseError) and exc.code in _DEPLOYMENT_FAULTS):
                # not the deployment's fault (the request's own 400, full, cancelled): if this was the probe
                # after a cooldown, let the next request probe instead
                deployment.route.probing = False
            raise
        if deployment.route.open_until != 0.0:
            log.warning("deployment %s of %s: circuit closed (the probe request succeeded)",
                        deployment.label, deployment.name)
        deployment.route.succeeded()
        self._events.admitted(deployment.name, waited)
        return Routed(deployment, result, in_flight)


def _exhausted(model: str, errors: list[InhouseError]) -> InhouseError:
    if not errors:
        return InhouseError(ErrorCode.UPSTREAM_UNAVAILABLE, f"no deployment of model '{model}' is available "
                            "(all are down or cooling off after failures); retry shortly", retry_after=5)
    if len(errors) == 1:
        return errors[0]
    if all(e.code is errors[-1].code for e in errors) and errors[-1].code is not ErrorCode.UPSTREAM_UNAVAILABLE:
        return errors[-1]
    reasons = "; ".join(dict.fromkeys(e.message for e in errors))
    return InhouseError(ErrorCode.UPSTREAM_UNAVAILABLE, f"no deployment of model '{model}' could answer: {reasons}",
                        retry_after=errors[-1].retry_after or 1)
