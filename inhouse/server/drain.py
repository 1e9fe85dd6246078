"""Drain: the server's shutdown on SIGTERM, without dropping what it already accepted.

Owns the draining flag, the count of API calls in flight, and the SIGTERM handler of the uvicorn server.
On SIGTERM: stop admitting (the access middleware answers new API calls 503 ``server_draining`` with
``Retry-After``, and ``/ready`` turns 503 so a load balancer moves traffic away), wait until the calls in
flight, streams included, have ended or ``drain_seconds`` have passed, then tell uvicorn to exit.  Uvicorn
then closes its connections and runs the app's lifespan shutdown, which closes the engines and flushes the
audit writer; the process exits 0.  A second SIGTERM, or SIGINT (Ctrl-C) at any time, exits without
waiting, as uvicorn does by default.  Only SIGTERM is taken here; other signals are left to their owners.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from types import FrameType

import uvicorn

__all__ = ["Drain", "DrainingServer"]

log = logging.getLogger("inhouse.drain")

_POLL_SECONDS = 0.05


class Drain:
    """The draining flag and the calls in flight, shared by the access middleware and the probes."""

    def __init__(self, seconds: float = 30.0) -> None:
        self.seconds = seconds
        self.draining = False
        self.in_flight = 0
        self._done: asyncio.Task[None] | None = None

    def enter(self) -> None:
        """An API call was admitted."""
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1

    def begin(self) -> asyncio.Task[None]:
        """Stop admitting and wait (in a task) for the calls in flight; the task ends when they did or at
        the deadline.  Calling it again returns the same task."""
        if self._done is None:
            self.draining = True
            log.warning("draining: refusing new requests; waiting up to %.0f s for %d in flight",
                        self.seconds, self.in_flight)
            self._done = asyncio.get_running_loop().create_task(self._wait())
        return self._done

    async def _wait(self) -> None:
        started = time.monotonic()
        deadline = started + self.seconds
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_SECONDS)
        if self.in_flight:
            log.warning("drain deadline (%.0f s) reached with %d requests still in flight; stopping anyway",
                        self.seconds, self.in_flight)
        else:
            log.warning("drained in %.1f s: no request in flight; stopping", time.monotonic() - started)


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose SIGTERM drains first (``Drain``) and only then exits; SIGINT is uvicorn's own."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM:
            super().handle_exit(sig, frame)  # SIGINT: uvicorn's own (stop now; a second one forces it)
            return
        if self._loop is None or self.drain.draining or self.should_exit:
            self.should_exit = True  # not started yet, or a second SIGTERM: stop now
            return
        # a signal handler runs between two bytecodes of the loop's thread: schedule, do not await here
        self._loop.call_soon_threadsafe(self._drain_then_exit)

    def _drain_then_exit(self) -> None:
        self.drain.begin().add_done_callback(lambda _: setattr(self, "should_exit", True))
