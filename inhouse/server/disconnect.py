"""The client going away: ClientDisconnectedError, and ``or_disconnect`` to stop work nobody waits for.

Raised while the body is still uploading or while a blocking answer is computed; the error handlers turn
it into the one outcome every disconnect gets: 499 ``client_disconnected`` in the audit log, one short log
line, no traceback.  (A stream the client leaves ends the same way, recorded by the access middleware.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

__all__ = ["ClientDisconnectedError", "or_disconnect"]

T = TypeVar("T")


class ClientDisconnectedError(Exception):
    """The client closed the connection before its answer was ready."""


async def _until_disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def or_disconnect(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result; if the client leaves first, ``work`` is cancelled (an engine drops what it had not
    run yet) and ClientDisconnectedError is raised.  The request's body must have been read."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():  # the client left (or we were cancelled): stop the work done for it
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientDisconnectedError
    return task.result()
