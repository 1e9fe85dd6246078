"""What every route needs, built once by the app factory and reached through ``request.app.state``."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.requests import Request

from inhouse.audit.writer import AuditWriter
from inhouse.config import Settings
from inhouse.gateway.registry import ModelRegistry
from inhouse.gateway.router import Router
from inhouse.gateway.swap import Swapper
from inhouse.keys.store import KeyStore
from inhouse.server.drain import Drain
from inhouse.storage.database import Database

__all__ = ["ServerContext", "context_of"]


@dataclass
class ServerContext:
    settings: Settings
    registry: ModelRegistry
    router: Router
    keys: KeyStore | None = None  # None: auth is off
    db: Database | None = None
    swapper: Swapper | None = None  # model swaps, canaries, rollback and reload (admin API)
    reload: Callable[[], Settings] | None = None  # re-reads the config file (None: nothing to re-read)
    drain: Drain = field(default_factory=Drain)  # SIGTERM: draining, and the calls in flight
    audit: AuditWriter | None = None  # for liveness: a stuck writer fails /health
    _counter: itertools.count[int] = field(default_factory=itertools.count)
    _prefix: str = field(default_factory=lambda: os.urandom(6).hex())

    def new_id(self, kind: str) -> str:
        return f"{kind}-{self._prefix}{next(self._counter):08x}"


def context_of(request: Request) -> ServerContext:
    ctx: ServerContext = request.app.state.inhouse
    return ctx
