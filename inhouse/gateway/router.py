"""Router: which deployment answers a request, and what to try when one fails.

Owns the retry and fallback loop.  For the asked model, then each of its fallbacks in order, it picks
the available deployment with the fewest requests in flight per unit of weight and submits.  An upstream
that fails before the first byte (unreachable, 429/5xx, a stall) counts against that deployment's
circuit breaker and is retried after a jittered backoff, at most ``retries`` more times per model; a
local engine that is loading or full sends the request to another deployment if there is one, else on
to the fallbacks, else its own 429/503 is the answer at once.  Errors that are the request's own
(400, context length) are raised at once.  After the first byte nothing is retried: the stream ends
with an error event instead.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

from inhouse.config import ModelSpec, RoutingSettings
from inhouse.engine.base import GenerateRequest, Generation
from inhouse.errors import ErrorCode, InhouseError
from inhouse.gateway.registry import Deployment, ModelRegistry

__all__ = ["Routed", "Router"]

log = logging.getLogger("inhouse.router")

# Failures worth trying elsewhere; the first is also the deployment's fault (counts for its circuit).
_DEPLOYMENT_FAULTS = {ErrorCode.UPSTREAM_UNAVAILABLE}
_TRY_ELSEWHERE = {ErrorCode.UPSTREAM_UNAVAILABLE, ErrorCode.QUEUE_FULL, ErrorCode.MODEL_LOADING,
                  ErrorCode.MODEL_UNAVAILABLE}


@dataclass(frozen=True)
class Routed:
    deployment: Deployment
    generations: list[Generation]

    @property
    def model(self) -> str:
        return self.deployment.name


class Router:
    def __init__(self, registry: ModelRegistry, routing: RoutingSettings) -> None:
        self._registry = registry
        self._routing = routing

    async def submit(self, model: str, build: Callable[[ModelSpec], list[GenerateRequest]]) -> Routed:
        first = self._registry.deployments(model)  # 404 for an unknown model, before anything else
        errors: list[InhouseError] = []
        for name in (model, *first[0].spec.fallbacks):
            routed = await self._try_model(name, build, errors)
            if routed is not None:
                if name != model:
                    log.warning("model %s: every deployment failed; answered by fallback %s", model, name)
                return routed
        raise _exhausted(model, errors)

    async def _try_model(self, name: str, build: Callable[[ModelSpec], list[GenerateRequest]],
                         errors: list[InhouseError]) -> Routed | None:
        deployments = self._registry.deployments(name)
        tried: set[str] = set()
        for attempt in range(1 + self._routing.retries):
            deployment = self._pick(deployments, tried)
            if deployment is None:
                return None
            tried.add(deployment.label)
            try:
                return Routed(deployment, await self._submit(deployment, build(deployment.spec)))
            except InhouseError as exc:
                if exc.code not in _TRY_ELSEWHERE:
                    raise
                errors.append(exc)
                if exc.code in _DEPLOYMENT_FAULTS:
                    r = self._routing
                    if deployment.route.failed(r.circuit_failures, r.circuit_window_seconds, r.cooldown_seconds):
                        log.warning("deployment %s of %s: circuit open for %.0f s after repeated failures",
                                    deployment.label, name, r.cooldown_seconds)
                else:
                    deployment.route.probing = False
                    if all(d.label in tried for d in deployments):
                        return None  # full or loading, and no other deployment: refuse now, no backoff
            if attempt < self._routing.retries:
                await asyncio.sleep(self._routing.backoff_seconds * 2 ** attempt * random.uniform(0.5, 1.5))
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

    async def _submit(self, deployment: Deployment, requests: list[GenerateRequest]) -> list[Generation]:
        route = deployment.route
        route.outstanding += 1
        try:
            generations = await deployment.engine.submit(requests)
        except BaseException as exc:
            route.outstanding -= 1
            if not isinstance(exc, InhouseError):
                route.probing = False  # cancelled mid-probe: let the next request probe instead
            raise
        route.succeeded()
        remaining = len(generations)

        def one_done() -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0:
                route.outstanding -= 1

        for generation in generations:
            generation.add_done_callback(one_done)
        return generations


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
