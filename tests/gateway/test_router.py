"""Router: retries before the first byte, another deployment first, fallbacks, refusals, balance, in-flight counts.

Deployments are real FakeEngines, and ``_Scripted``: an engine that raises the errors it was given, one per
submit, then answers as a FakeEngine.  The attempt is what the chat route does on a deployment: submit the
call's requests to its engine.  Backoff is zero, so no test waits on the router.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from inhouse.config import FakeSpec, RoutingSettings, Settings
from inhouse.engine.base import (
    Engine,
    EngineInfo,
    EngineState,
    EngineStats,
    GenerateRequest,
    Generation,
    SamplingParams,
)
from inhouse.engine.factory import build_engine
from inhouse.engine.fake import FakeEngine
from inhouse.engine.upstream import UpstreamUnavailableError
from inhouse.errors import ErrorCode, InhouseError
from inhouse.gateway.registry import Deployment, ModelRegistry
from inhouse.gateway.router import Routed, Router

REPLY = "one two three"

_ScriptedFactory = Callable[[FakeSpec], Engine]


class _Scripted:
    """Raises ``failures`` in order, one per submit (forever the last one with ``forever``), then answers."""

    def __init__(self, spec: FakeSpec, failures: Sequence[InhouseError] = (), forever: bool = False) -> None:
        self._inner = FakeEngine(spec)
        self._failures = list(failures)
        self._forever = forever
        self.submits = 0

    @property
    def info(self) -> EngineInfo:
        return self._inner.info

    @property
    def state(self) -> EngineState:
        return self._inner.state

    async def start(self) -> None:
        await self._inner.start()

    def stats(self) -> EngineStats:
        return self._inner.stats()

    async def close(self) -> None:
        await self._inner.close()

    async def submit(self, requests: Sequence[GenerateRequest]) -> list[Generation]:
        self.submits += 1
        if self._failures:
            failure = self._failures[0] if self._forever and len(self._failures) == 1 else self._failures.pop(0)
            raise failure
        return await self._inner.submit(requests)


def down(times: int = 1) -> list[InhouseError]:
    return [UpstreamUnavailableError(f"upstream down ({i})") for i in range(times)]


def always_down() -> _ScriptedFactory:
    return lambda spec: _Scripted(spec, down(), forever=True)


def spec(name: str, deployment: str | None = None, **fields: object) -> FakeSpec:
    return FakeSpec(name=name, deployment=deployment, fake_reply=REPLY, **fields)  # type: ignore[arg-type]


async def gateway(tmp_path: Path, specs: list[FakeSpec], engines: dict[str, _ScriptedFactory] | None = None,
                  **routing: object) -> tuple[Router, ModelRegistry]:
    """Settings → registry → router, as ``inhouse serve`` builds them; ``engines`` swaps in scripted ones by label."""
    settings = Settings(models=tuple(specs), cache_dir=tmp_path, state_dir=tmp_path,
                        routing=RoutingSettings(**{"backoff_seconds": 0, **routing}))  # type: ignore[arg-type]
    engines = engines or {}
    registry = ModelRegistry.of(
        (s, engines[s.deployment_label](s) if s.deployment_label in engines else build_engine(s, settings.cache_dir))
        for s in settings.models)
    registry.start_loading()
    await registry.wait_loaded()
    return Router(registry, settings.routing), registry


def requests(n: int = 1, max_tokens: int | None = None) -> list[GenerateRequest]:
    return [GenerateRequest(f"req-{i}", SamplingParams(max_tokens=max_tokens),
                            messages=({"role": "user", "content": "hello there"},)) for i in range(n)]


async def admit(router: Router, model: str, n: int = 1, max_tokens: int | None = None) -> Routed[list[Generation]]:
    """Route one call as the chat route does: the attempt submits its requests to the chosen deployment's engine."""
    return await router.call(model, lambda d: d.engine.submit(requests(n, max_tokens)))


async def text_of(generation: Generation) -> str:
    return "".join([delta.text async for delta in generation])


def deployment(registry: ModelRegistry, label: str) -> Deployment:
    return next(d for d in registry.all() if d.label == label)


def scripted(registry: ModelRegistry, label: str) -> _Scripted:
    engine = deployment(registry, label).engine
    assert isinstance(engine, _Scripted)
    return engine


async def test_answers_from_the_only_deployment(tmp_path: Path) -> None:
    router, registry = await gateway(tmp_path, [spec("m")])
    routed = await admit(router, "m")
    assert routed.model == "m" and routed.deployment is registry.get("m")
    assert await text_of(routed.result[0]) == REPLY
    await registry.close()


async def test_unknown_model_is_404_before_anything_is_tried(tmp_path: Path) -> None:
    router, registry = await gateway(tmp_path, [spec("m")])
    with pytest.raises(InhouseError) as raised:
        await admit(router, "nope")
    assert raised.value.code is ErrorCode.MODEL_NOT_FOUND and raised.value.param == "model"
    await registry.close()


async def test_retries_before_the_first_byte_up_to_retries(tmp_path: Path) -> None:
    router, registry = await gateway(tmp_path, [spec("m")], {"m": lambda s: _Scripted(s, down(2))},
                                     retries=2, circuit_failures=100)
    routed = await admit(router, "m")
    assert scripted(registry, "m").submits == 3
    assert await text_of(routed.result[0]) == REPLY
    assert len(routed.deployment.route.failures) == 0  # the success cleared them
    await registry.close()


async def test_gives_up_after_retries_with_every_reason(tmp_path: Path) -> None:
    router, registry = await gateway(tmp_path, [spec("m")], {"m": lambda s: _Scripted(s, down(5))},
                                     retries=2, circuit_failures=100)
    with pytest.raises(InhouseError) as raised:
        await admit(router, "m")
    assert scripted(registry, "m").submits == 3  # 1 + retries, no more
    assert raised.value.code is ErrorCode.UPSTREAM_UNAVAILABLE and raised.value.status == 503
    assert "upstream down (0)" in raised.value.message and "upstream down (2)" in raised.value.message
    assert deployment(registry, "m").route.outstanding == 0
    await registry.close()


async def test_no_retries_means_one_try(tmp_path: Path) -> None:
    router, registry = await gateway(tmp_path, [spec("m")], {"m": lambda s: _Scripted(s, down(1))}, retries=0)
    with pytest.raises(InhouseError) as raised:
        await admit(router, "m")
    assert scripted(registry, "m").submits == 1 and raised.value.message == "upstream down (0)"
    await registry.close()


async def test_a_retry_prefers_a_deployment_not_tried_yet(tmp_path: Path) -> None:
    # a's weight makes it the first choice every time; after it fails, untried b wins over it
    specs = [spec("m", "a", weight=10.0), spec("m", "b")]
    router, registry = await gateway(tmp_path, specs, {"a": always_down(), "b": lambda s: _Scripted(s)},
                                     retries=3, circuit_failures=100)
    routed = await admit(router, "m")
    assert routed.deployment.label == "b"
    assert scripted(registry, "a").submits == 1 and scripted(registry, "b").submits == 1
    assert await text_of(routed.result[0]) == REPLY
    await registry.close()


async def test_failures_open_the_circuit_and_the_router_then_skips_the_deployment(tmp_path: Path) -> None:
    specs = [spec("m", "a", weight=10.0), spec("m", "b")]
    router, registry = await gateway(tmp_path, specs, {"a": always_down(), "b": lambda s: _Scripted(s)},
                                     retries=1, circuit_failures=2, cooldown_seconds=60)
    for _ in range(2):
        routed = await admit(router, "m")
        assert routed.deployment.label == "b"
        await text_of(routed.result[0])
    a = deployment(registry, "a")
    assert a.route.circuit == "open" and scripted(registry, "a").submits == 2
    routed = await admit(router, "m")  # a is out of rotation: straight to b
    assert routed.deployment.label == "b" and scripted(registry, "a").submits == 2
    await text_of(routed.result[0])
    await registry.close()


async def test_every_deployment_open_is_503_without_trying_any(tmp_path: Path) -> None:
    router, registry = await gateway(tmp_path, [spec("m")], {"m": always_down()},
                                     retries=0, circuit_failures=1, cooldown_seconds=60)
    with pytest.raises(InhouseError):
        await admit(router, "m")
    with pytest.raises(InhouseError) as raised:
        await admit(router, "m")
    assert scripted(registry, "m").submits == 1
    assert raised.value.code is ErrorCode.UPSTREAM_UNAVAILABLE and raised.value.retry_after is not None
    await registry.close()


async def test_the_fallback_answers_when_every_deployment_fails(tmp_path: Path) -> None:
    specs = [spec("main", "a", fallbacks=("backup",)), spec("main", "b"), spec("backup")]
    router, registry = await gateway(tmp_path, specs, {"a": always_down(), "b": always_down()},
                                     retries=2, circuit_failures=100)
    routed = await admit(router, "main")
    assert routed.model == "backup" and routed.deployment.label == "backup"
    assert scripted(registry, "a").submits + scripted(registry, "b").submits == 3  # 1 + retries on main
    assert await text_of(routed.result[0]) == REPLY
    await registry.close()


async def test_fallbacks_are_tried_in_order(tmp_path: Path) -> None:
    specs = [spec("main", fallbacks=("first", "second")), spec("first"), spec("second")]
    router, registry = await gateway(tmp_path, specs, {"main": always_down(), "first": always_down()}, retries=0)
    routed = await admit(router, "main")
    assert routed.model == "second"
    assert scripted(registry, "main").submits == 1 and scripted(registry, "first").submits == 1
    await text_of(routed.result[0])
    await registry.close()


async def test_when_the_fallback_fails_too_the_error_names_both(tmp_path: Path) -> None:
    specs = [spec("main", fallbacks=("backup",)), spec("backup")]
    engines: dict[str, _ScriptedFactory] = {
        "main": lambda s: _Scripted(s, [UpstreamUnavailableError("main is down")], forever=True),
        "backup": lambda s: _Scripted(s, [UpstreamUnavailableError("backup is down")], forever=True),
    }
    router, registry = await gateway(tmp_path, specs, engines, retries=0)
    with pytest.raises(InhouseError) as raised:
        await admit(router, "main")
    assert raised.value.code is ErrorCode.UPSTREAM_UNAVAILABLE
    assert "main is down" in raised.value.message and "backup is down" in raised.value.message
    await registry.close()


@pytest.mark.parametrize("code", [ErrorCode.INVALID_REQUEST, ErrorCode.CONTEXT_LENGTH_EXCEEDED])
async def test_the_requests_own_errors_are_raised_at_once(tmp_path: Path, code: ErrorCode) -> None:
    bad = InhouseError(code, "your request is wrong", param="messages")
    specs = [spec("main", "a", weight=10.0, fallbacks=("backup",)), spec("main", "b"), spec("backup")]
    engines: dict[str, _ScriptedFactory] = {"a": lambda s: _Scripted(s, [bad]), "b": lambda s: _Scripted(s),
                                            "backup": lambda s: _Scripted(s)}
    router, registry = await gateway(tmp_path, specs, engines, retries=3)
    with pytest.raises(InhouseError) as raised:
        await admit(router, "main")
    assert raised.value is bad and raised.value.status == 400
    assert scripted(registry, "a").submits == 1
    assert scripted(registry, "b").submits == 0 and scripted(registry, "backup").submits == 0
    assert len(deployment(registry, "a").route.failures) == 0  # not the deployment's fault
    await registry.close()


async def test_context_length_from_a_real_engine_is_not_retried(tmp_path: Path) -> None:
    specs = [spec("m", context_length=16, fallbacks=("backup",)), spec("backup")]
    router, registry = await gateway(tmp_path, specs, {"backup": lambda s: _Scripted(s)}, retries=2)
    with pytest.raises(InhouseError) as raised:
        await admit(router, "m", max_tokens=100)
    assert raised.value.code is ErrorCode.CONTEXT_LENGTH_EXCEEDED and raised.value.param == "max_tokens"
    assert scripted(registry, "backup").submits == 0
    await registry.close()


async def test_a_full_single_deployment_is_refused_at_once(tmp_path: Path) -> None:
    # a backoff of a minute: if the router backed off before refusing, the timeout below would fire
    specs = [spec("m", max_num_seqs=1, max_waiting=0, fake_token_delay=0.05)]
    router, registry = await gateway(tmp_path, specs, retries=3, backoff_seconds=60)
    busy = await admit(router, "m")
    async with asyncio.timeout(10):
        with pytest.raises(InhouseError) as raised:
            await admit(router, "m")
    assert raised.value.code is ErrorCode.QUEUE_FULL and raised.value.status == 429
    assert raised.value.retry_after is not None
    only = registry.get("m")
    assert only.route.outstanding == 1 and only.route.circuit == "closed"  # full is not a failure
    busy.result[0].abort()
    busy.release()
    assert only.route.outstanding == 0
    await registry.close()


async def test_a_full_deployment_sends_the_request_to_another(tmp_path: Path) -> None:
    full = InhouseError(ErrorCode.QUEUE_FULL, "full", retry_after=1)
    specs = [spec("m", "a", weight=10.0), spec("m", "b")]
    router, registry = await gateway(tmp_path, specs, {"a": lambda s: _Scripted(s, [full], forever=True),
                                                       "b": lambda s: _Scripted(s)}, retries=1)
    routed = await admit(router, "m")
    assert routed.deployment.label == "b"
    assert deployment(registry, "a").route.circuit == "closed"
    await text_of(routed.result[0])
    await registry.close()


async def test_an_unavailable_deployment_hands_over_to_the_fallback(tmp_path: Path) -> None:
    specs = [spec("m", fallbacks=("backup",)), spec("backup")]
    router, registry = await gateway(tmp_path, specs, retries=2)
    await registry.get("m").engine.close()  # no longer ready: 503 model_unavailable, worth trying elsewhere
    routed = await admit(router, "m")
    assert routed.model == "backup"
    assert await text_of(routed.result[0]) == REPLY
    await registry.close()


async def test_least_outstanding_per_unit_of_weight(tmp_path: Path) -> None:
    specs = [spec("m", "heavy", weight=3.0), spec("m", "light", weight=1.0)]
    router, registry = await gateway(tmp_path, specs)
    held = [await admit(router, "m") for _ in range(8)]  # none finishes: the load only grows
    heavy, light = deployment(registry, "heavy"), deployment(registry, "light")
    # (load + 1) / weight picks heavy, heavy, either, then the other: every 4 requests go 3 : 1
    assert (heavy.route.outstanding, light.route.outstanding) == (6, 2)
    assert sum(r.deployment is heavy for r in held) == 6
    for routed in held:
        routed.result[0].abort()
        routed.release()
    assert heavy.route.outstanding == light.route.outstanding == 0
    await registry.close()


async def test_the_least_loaded_deployment_is_chosen(tmp_path: Path) -> None:
    specs = [spec("m", "a"), spec("m", "b")]
    router, registry = await gateway(tmp_path, specs)
    first = await admit(router, "m")
    second = await admit(router, "m")
    assert {first.deployment.label, second.deployment.label} == {"a", "b"}
    await text_of(first.result[0])
    first.release()  # the first's deployment is idle again
    third = await admit(router, "m")
    assert third.deployment is first.deployment
    for routed in (second, third):
        await text_of(routed.result[0])
        routed.release()
    await registry.close()


async def test_a_call_stays_in_flight_until_released_once(tmp_path: Path) -> None:
    router, registry = await gateway(tmp_path, [spec("m")])
    route = registry.get("m").route
    routed = await admit(router, "m", n=3)
    assert len(routed.result) == 3 and route.outstanding == 1  # one call, however many choices
    for generation in routed.result:
        assert await text_of(generation) == REPLY
    assert route.outstanding == 1  # the router knows no Generation: the caller says when the work is over
    routed.release()
    assert route.outstanding == 0
    routed.release()  # twice: counted once
    assert route.outstanding == 0
    await registry.close()


async def test_a_failed_attempt_is_not_left_in_flight(tmp_path: Path) -> None:
    specs = [spec("m", "a", weight=10.0), spec("m", "b")]
    router, registry = await gateway(tmp_path, specs, {"a": always_down(), "b": lambda s: _Scripted(s)},
                                     retries=1, circuit_failures=100)
    routed = await admit(router, "m")
    assert deployment(registry, "a").route.outstanding == 0 and deployment(registry, "b").route.outstanding == 1
    routed.release()
    await registry.close()


async def test_the_attempt_may_be_any_operation(tmp_path: Path) -> None:
    router, registry = await gateway(tmp_path, [spec("m", "a", weight=10.0), spec("m", "b")],
                                     {"a": always_down()}, retries=1, circuit_failures=100)

    async def embed(d: Deployment) -> str:  # not a generation: the router only runs it and counts it
        await d.engine.submit([])
        return f"vectors from {d.label}"

    routed = await router.call("m", embed)
    assert routed.result == "vectors from b" and routed.deployment.route.outstanding == 1
    routed.release()
    await registry.close()


async def test_a_bug_in_the_attempt_is_raised_at_once_and_not_counted(tmp_path: Path) -> None:
    router, registry = await gateway(tmp_path, [spec("m", fallbacks=("backup",)), spec("backup")], retries=3)
    tries: list[str] = []

    async def broken(d: Deployment) -> None:
        tries.append(d.label)
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError):
        await router.call("m", broken)
    assert tries == ["m"] and all(d.route.outstanding == 0 for d in registry.all())
    await registry.close()


async def test_after_the_cooldown_one_request_probes_and_its_success_closes_the_circuit(tmp_path: Path) -> None:
    router, registry = await gateway(tmp_path, [spec("m")], {"m": lambda s: _Scripted(s, down(1))},
                                     retries=0, circuit_failures=1, cooldown_seconds=0.02)
    with pytest.raises(InhouseError):
        await admit(router, "m")
    route = registry.get("m").route
    assert route.circuit == "open"
    await asyncio.sleep(0.1)
    routed = await admit(router, "m")
    assert route.circuit == "closed" and not route.probing
    assert await text_of(routed.result[0]) == REPLY
    await registry.close()


async def test_a_probe_refused_as_a_bad_request_does_not_wedge_the_deployment(tmp_path: Path) -> None:
    bad = InhouseError(ErrorCode.CONTEXT_LENGTH_EXCEEDED, "too long", param="messages")
    router, registry = await gateway(tmp_path, [spec("m")], {"m": lambda s: _Scripted(s, [*down(1), bad])},
                                     retries=0, circuit_failures=1, cooldown_seconds=0.02)
    with pytest.raises(InhouseError):
        await admit(router, "m")
    await asyncio.sleep(0.1)
    with pytest.raises(InhouseError) as raised:
        await admit(router, "m")  # the probe: the request's own fault, says nothing about the deployment
    assert raised.value is bad
    try:
        routed = await admit(router, "m")  # the engine answers this one, if the router lets it through
        assert await text_of(routed.result[0]) == REPLY
    finally:
        await registry.close()
