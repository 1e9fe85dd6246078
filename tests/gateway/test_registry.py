"""ModelRegistry as a live set: ``replace`` swaps at once, drains the old engines, then closes them (at the
deadline regardless); an engine shared by several names starts once and closes once; the health monitor
follows the registry.

Deployments are FakeEngines (``_Counted``: counts its starts and closes; ``_Probed``: also a HealthProbe
with a scripted verdict).  Requests go through the real Router, their in-flight count released when their
generations end, as the chat route does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from inhouse.config import FakeSpec, RoutingSettings, UpstreamSpec
from inhouse.engine.base import EngineState, GenerateRequest, Generation, SamplingParams
from inhouse.engine.fake import FakeEngine
from inhouse.engine.upstream import UpstreamEngine
from inhouse.errors import ErrorCode, InhouseError
from inhouse.gateway.health import HealthMonitor, HealthProbe
from inhouse.gateway.registry import Deployment, ModelRegistry
from inhouse.gateway.router import Router

ROUTING = RoutingSettings(backoff_seconds=0, health_interval_seconds=0.02, health_timeout_seconds=1)


class _Counted(FakeEngine):
    def __init__(self, spec: FakeSpec) -> None:
        super().__init__(spec)
        self.starts = self.closes = 0

    async def start(self) -> None:
        self.starts += 1
        await super().start()

    async def close(self) -> None:
        self.closes += 1
        await super().close()


class _Probed(_Counted):
    def __init__(self, spec: FakeSpec, reason: str | None = None) -> None:
        super().__init__(spec)
        self.reason = reason
        self.probes = 0

    async def probe(self, timeout: float, kind: str) -> str | None:
        self.probes += 1
        return self.reason


def deployment(name: str, label: str, reply: str = "old answer", delay: float = 0.0,
               engine: FakeEngine | None = None) -> Deployment:
    spec = FakeSpec(name=name, deployment=label, fake_reply=reply, fake_token_delay=delay)
    return Deployment(spec, engine or _Counted(spec), created=0)


def counted(d: Deployment) -> _Counted:
    assert isinstance(d.engine, _Counted)
    return d.engine


async def loaded(*deployments: Deployment) -> ModelRegistry:
    registry = ModelRegistry(deployments)
    registry.start_loading()
    await registry.wait_loaded()
    return registry


@pytest.fixture
async def cleanup() -> AsyncIterator[list[ModelRegistry]]:
    registries: list[ModelRegistry] = []
    yield registries
    for registry in registries:
        await registry.close()


async def admit(router: Router, model: str) -> tuple[Deployment, Generation]:
    """One chat call through the router; its in-flight count ends with its generation, as in ``route()``."""
    build = [GenerateRequest("r", SamplingParams(), messages=({"role": "user", "content": "hi"},))]
    routed = await router.call(model, lambda d: d.engine.submit(build))
    generation = routed.result[0]
    generation.add_done_callback(routed.release)
    return routed.deployment, generation


async def text_of(generation: Generation) -> str:
    return "".join([delta.text async for delta in generation])


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def within(seconds: float, work: Awaitable[None]) -> float:
    started = time.monotonic()
    async with asyncio.timeout(seconds):
        await work
    return time.monotonic() - started


async def test_replace_swaps_at_once_and_closes_the_old_engine_once_it_drained(
    cleanup: list[ModelRegistry],
) -> None:
    old = deployment("m", "old", "one two three four", delay=0.05)
    registry = await loaded(old)
    cleanup.append(registry)
    router = Router(registry, ROUTING)
    served, in_flight = await admit(router, "m")
    assert served is old and old.route.outstanding == 1

    new = deployment("m", "new", "new answer")
    replacing = asyncio.create_task(registry.replace("m", [new], drain_seconds=10))
    await until(lambda: registry.get("m") is new)
    assert counted(new).starts == 1 and new.engine.state is EngineState.READY, "started before the swap"
    served, fresh = await admit(router, "m")
    assert served is new, "new requests go to the new set at once"
    assert await text_of(fresh) == "new answer"
    assert not replacing.done() and counted(old).closes == 0, "the old engine waits for its request"

    assert await text_of(in_flight) == "one two three four", "the request in flight finishes on the old engine"
    await within(2, replacing)
    assert counted(old).closes == 1 and old.engine.state is EngineState.CLOSED
    assert counted(new).closes == 0 and registry.all() == [new]
    await registry.close()
    assert counted(new).closes == 1 and counted(old).closes == 1, "each engine closed once"


async def test_an_engine_that_does_not_drain_is_closed_at_the_deadline(cleanup: list[ModelRegistry]) -> None:
    old = deployment("m", "old", "slow words never end", delay=5.0)
    registry = await loaded(old)
    cleanup.append(registry)
    router = Router(registry, ROUTING)
    _, stuck = await admit(router, "m")

    elapsed = await within(3, registry.replace("m", [deployment("m", "new")], drain_seconds=0.2))
    assert 0.2 <= elapsed < 2
    assert counted(old).closes == 1, "closed anyway at the deadline"
    with pytest.raises(InhouseError) as raised:
        await text_of(stuck)
    assert raised.value.code is ErrorCode.MODEL_UNAVAILABLE  # the cut request gets an error, not silence
    assert old.route.outstanding == 0


async def test_remove_and_add(cleanup: list[ModelRegistry]) -> None:
    a, b = deployment("a", "a"), deployment("b", "b")
    registry = await loaded(a, b)
    cleanup.append(registry)
    router = Router(registry, ROUTING)
    await registry.remove("b", drain_seconds=1)
    assert registry.names() == ["a"] and counted(b).closes == 1
    with pytest.raises(InhouseError) as raised:
        await admit(router, "b")
    assert raised.value.code is ErrorCode.MODEL_NOT_FOUND
    second = deployment("a", "a2", "second answer")
    await registry.add(second)
    assert registry.deployments("a") == [a, second] and counted(second).starts == 1
    assert counted(a).closes == 0, "adding a deployment leaves the others serving"
    with pytest.raises(InhouseError):
        await registry.remove("nope")


async def test_a_shared_engine_is_started_once_and_closed_once(cleanup: list[ModelRegistry]) -> None:
    base = deployment("base", "base", "shared answer")
    engine = counted(base)
    adapter = deployment("adapter", "adapter", engine=engine)  # one engine behind two public names
    registry = await loaded(base, adapter)
    cleanup.append(registry)
    router = Router(registry, ROUTING)
    assert engine.starts == 1

    again = deployment("adapter", "adapter-2", engine=engine)
    await registry.replace("adapter", [again], drain_seconds=1)
    assert engine.starts == 1 and engine.closes == 0, "still used: neither restarted nor closed"
    await registry.remove("adapter", drain_seconds=1)
    assert engine.closes == 0, "base still uses it"
    _, generation = await admit(router, "base")
    assert await text_of(generation) == "shared answer"

    await registry.replace("base", [deployment("base", "base-2")], drain_seconds=1)
    assert engine.closes == 1, "closed with the last deployment using it"
    await registry.close()
    assert engine.starts == 1 and engine.closes == 1


async def test_a_load_error_belongs_to_the_engine_and_goes_with_it(cleanup: list[ModelRegistry]) -> None:
    class _Broken(_Counted):
        async def start(self) -> None:
            raise RuntimeError("no weights")

    spec = FakeSpec(name="m")
    broken = Deployment(spec, _Broken(spec), created=0)
    registry = await loaded(broken)
    cleanup.append(registry)
    assert registry.load_error(broken) == "the model failed to load; the reason is in the server log"
    healthy = deployment("m", "fixed")
    await registry.replace("m", [healthy], drain_seconds=0)
    assert registry.load_error(healthy) is None and registry.ready()


async def test_the_health_monitor_follows_a_replace(cleanup: list[ModelRegistry]) -> None:
    spec = FakeSpec(name="m", deployment="old")
    old = Deployment(spec, _Probed(spec), created=0)
    plain = deployment("local", "local")  # a FakeEngine is no HealthProbe: never probed
    registry = await loaded(old, plain)
    cleanup.append(registry)
    monitor = HealthMonitor(registry, ROUTING)
    monitor.start()
    try:
        assert isinstance(old.engine, _Probed)
        old_engine = old.engine
        await until(lambda: old_engine.probes >= 2)

        spec = FakeSpec(name="m", deployment="new")
        new_engine = _Probed(spec, reason="the upstream does not serve model 'm'; it lists: other")
        new = Deployment(spec, new_engine, created=0)
        await registry.replace("m", [new], drain_seconds=0)
        await until(lambda: not new.route.healthy)
        assert new.route.health_error == "the upstream does not serve model 'm'; it lists: other"
        probes = old_engine.probes
        await until(lambda: new_engine.probes >= probes + 3)
        assert old_engine.probes <= probes + 1, "a replaced engine is no longer probed"

        new_engine.reason = None
        await until(lambda: new.route.healthy)
        assert new.route.health_error is None

        await registry.remove("m", drain_seconds=0)
        probes = new_engine.probes
        await asyncio.sleep(0.1)
        assert new_engine.probes <= probes + 1, "a removed engine is no longer probed"
    finally:
        await monitor.stop()


async def test_a_shared_probed_engine_is_probed_once_per_round(cleanup: list[ModelRegistry]) -> None:
    spec = FakeSpec(name="a")
    engine = _Probed(spec, reason="down")
    one, two = Deployment(spec, engine, created=0), deployment("b", "b", engine=engine)
    registry = await loaded(one, two)
    cleanup.append(registry)
    await HealthMonitor(registry, ROUTING).check()
    assert engine.probes == 1
    assert one.route.health_error == two.route.health_error == "down"


def test_upstream_engines_declare_the_probe_and_local_ones_do_not() -> None:
    upstream = UpstreamEngine(UpstreamSpec(name="u", base_url="http://127.0.0.1:9/v1"))
    assert isinstance(upstream, HealthProbe)
    assert not isinstance(FakeEngine(FakeSpec(name="f")), HealthProbe)
