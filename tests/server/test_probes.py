"""Liveness, readiness, model state and the drain, in process on real parts (FakeEngines, SQLite audit).

``/ready`` is 503 while a model loads (an engine whose start waits for the test) and while the server drains;
``/health`` is 503 when an engine died (``fake_die_after``) or the audit writer holds a row too long (its
database locked by another connection); model cards and ``GET /admin/models`` say loading / ready /
draining / failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from inhouse.audit.record import AuditRecord
from inhouse.audit.writer import AuditWriter
from inhouse.config import FakeSpec, Settings
from inhouse.engine.fake import FakeEngine
from inhouse.gateway.health import HealthMonitor
from inhouse.gateway.registry import ModelRegistry
from inhouse.gateway.router import Router
from inhouse.server.app import create_app
from inhouse.server.drain import Drain
from inhouse.server.probes import liveness_problems
from inhouse.storage.database import Database

HI = [{"role": "user", "content": "hi"}]


class GatedEngine(FakeEngine):
    """A fake engine that finishes loading when the test opens its gate."""

    def __init__(self, spec: FakeSpec) -> None:
        super().__init__(spec)
        self.gate = asyncio.Event()

    async def start(self) -> None:
        await self.gate.wait()
        await super().start()


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, *engines: FakeEngine,
                  loaded: bool = True) -> AsyncIterator[tuple[httpx.AsyncClient, Drain]]:
    settings = Settings(models=tuple(e.spec for e in engines), auth="none", cache_dir=tmp_path, state_dir=tmp_path)
    registry = ModelRegistry.of((e.spec, e) for e in engines)
    drain = Drain(5.0)
    app = create_app(settings, registry, Router(registry, settings.routing),
                     HealthMonitor(registry, settings.routing), drain=drain)
    async with app.router.lifespan_context(app):
        if loaded:
            await registry.wait_loaded()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://inhouse.test") as client:
            yield client, drain


async def test_ready_waits_for_loading_then_turns_503_while_draining(tmp_path: Path) -> None:
    gated = GatedEngine(FakeSpec(name="slow-load"))
    quick = FakeEngine(FakeSpec(name="quick"))
    async with serving(tmp_path, gated, quick, loaded=False) as (client, drain):
        for _ in range(200):  # the quick one loads at once (in a task the lifespan started)
            if quick.state.value == "ready":
                break
            await asyncio.sleep(0.01)
        ready = await client.get("/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "loading"
        assert (await client.get("/health")).status_code == 200  # loading is alive
        card = (await client.get("/v1/models/slow-load")).json()
        assert card["state"] == "loading"
        states = {m["id"]: m["state"] for m in (await client.get("/admin/models")).json()["data"]}
        assert states == {"slow-load": "loading", "quick": "ready"}

        gated.gate.set()
        for _ in range(200):
            if (await client.get("/ready")).status_code == 200:
                break
            await asyncio.sleep(0.01)
        assert (await client.get("/ready")).json()["status"] == "ready"
        assert (await client.get("/v1/models/slow-load")).json()["state"] == "ready"

        drained = drain.begin()
        ready = await client.get("/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        refused = await client.post("/v1/chat/completions", json={"model": "quick", "messages": HI})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        assert refused.json()["error"]["code"] == "server_draining"
        assert refused.json()["error"]["type"] == "service_unavailable_error"
        assert (await client.get("/health")).status_code == 200  # draining is alive
        await asyncio.wait_for(drained, 5)  # nothing in flight: drained at once


async def test_a_drain_ends_when_the_last_call_leaves_or_at_its_deadline() -> None:
    drain = Drain(30.0)
    drain.enter()
    drained = drain.begin()
    assert drain.draining and drain.begin() is drained
    await asyncio.sleep(0.2)
    assert not drained.done()  # a call is in flight (the e2e test streams through a real drain)
    drain.leave()
    await asyncio.wait_for(drained, 5)

    late = Drain(0.2)
    late.enter()
    started = time.monotonic()
    await asyncio.wait_for(late.begin(), 5)
    assert late.in_flight == 1 and time.monotonic() - started >= 0.2


async def test_liveness_fails_when_an_engine_dies(tmp_path: Path) -> None:
    mortal = FakeEngine(FakeSpec(name="mortal", fake_die_after=1))
    async with serving(tmp_path, mortal, FakeEngine(FakeSpec(name="fine"))) as (client, _):
        assert (await client.get("/health")).json()["status"] == "ok"
        answered = await client.post("/v1/chat/completions", json={"model": "mortal", "messages": HI})
        assert answered.status_code == 200
        health = await client.get("/health")
        assert health.status_code == 503, health.text
        body = health.json()
        assert body["status"] == "unhealthy" and body["problems"] == ["the engine loop of mortal (mortal) died"]
        assert body["models"]["mortal"]["alive"] is False and body["models"]["mortal"]["state"] == "failed"
        assert body["models"]["fine"]["alive"] is True
        refused = await client.post("/v1/chat/completions", json={"model": "mortal", "messages": HI})
        assert refused.status_code == 503
        cards = {m["id"]: m["state"] for m in (await client.get("/v1/models")).json()["data"]}
        assert cards == {"mortal": "failed", "fine": "ready"}


async def test_liveness_fails_while_the_audit_writer_holds_a_row_too_long(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'audit.db'}")
    db.migrate()
    writer = AuditWriter(db)
    writer.start()
    registry = ModelRegistry.of([])
    locker = sqlite3.connect(tmp_path / "audit.db", isolation_level=None)
    try:
        assert liveness_problems(registry, writer, 0.2) == []
        locker.execute("BEGIN IMMEDIATE")  # another process holds the write lock: the writer waits
        write = asyncio.create_task(writer.write(AuditRecord(at=time.time(), request_id="r", method="POST",
                                                             path="/v1/chat/completions")))
        deadline = time.monotonic() + 10
        while writer.stalled_for() <= 0.2:
            assert time.monotonic() < deadline, "the writer never looked stalled"
            await asyncio.sleep(0.05)
        problems = liveness_problems(registry, writer, 0.2)
        assert len(problems) == 1 and "audit writer has held a row" in problems[0]
        locker.execute("ROLLBACK")
        await asyncio.wait_for(write, 10)
        assert writer.stalled_for() == 0.0
        assert liveness_problems(registry, writer, 0.2) == []
    finally:
        locker.close()
        writer.close()
        db.close()
    assert not writer.alive
    assert liveness_problems(registry, writer, 0.2) == ["the audit writer thread died"]
