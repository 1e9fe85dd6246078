"""The hand-off between an engine's background loop and one waiting request.

The producer (engine thread or task) calls ``put``; the consumer (the request's coroutine) awaits
``get``.  Items that pile up while the consumer is slow are merged into one, so a slow client gets
bigger deltas, never an unbounded queue.  Nothing else is shared between the two sides.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Generic, Protocol, Self, TypeVar

__all__ = ["OutputCollector"]


class _Mergeable(Protocol):
    def merge(self, later: Self) -> None: ...


T = TypeVar("T", bound=_Mergeable)


class OutputCollector(Generic[T]):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: T | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, item: T) -> None:
        """Thread-safe: hand over an item, merging it into one still unread."""
        with self._lock:
            if self._pending is None:
                self._pending = item
                notify = True
            else:
                self._pending.merge(item)
                notify = False
        if notify:
            self._wake()

    def fail(self, error: BaseException) -> None:
        """Thread-safe: end the stream with an error raised to the consumer."""
        with self._lock:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._ready.set()
        else:
            self._loop.call_soon_threadsafe(self._ready.set)

    async def get(self) -> T:
        while True:
            with self._lock:
                item, self._pending = self._pending, None
                error = self._error
                if item is None and error is None:
                    self._ready.clear()
            if item is not None:
                return item
            if error is not None:
                raise error
            await self._ready.wait()
