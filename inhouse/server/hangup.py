"""SIGHUP → re-read the config file and apply it (the same path as ``POST /admin/reload``).

Owns the signal handler only: one reload at a time; a refused file is logged and nothing changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

from inhouse.config import ConfigError, Settings
from inhouse.gateway.swap import Swapper

__all__ = ["reload_on_sighup"]

log = logging.getLogger("inhouse.reload")


def reload_on_sighup(swapper: Swapper, reload: Callable[[], Settings]) -> Callable[[], None]:
    """Install the handler on the running loop; returns the function that removes it."""
    loop = asyncio.get_running_loop()
    running: set[asyncio.Task[None]] = set()

    async def apply() -> None:
        try:
            settings = await asyncio.to_thread(reload)
        except ConfigError as exc:
            log.error("SIGHUP: the config file was refused, nothing changed: %s", exc)
            return
        try:
            log.info("SIGHUP: config reloaded: %s", await swapper.reload(settings))
        except Exception:
            log.exception("SIGHUP: applying the config failed")

    def handle() -> None:
        if running:
            log.warning("SIGHUP: a reload is already running; ignored")
            return
        task = loop.create_task(apply())
        running.add(task)
        task.add_done_callback(running.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, handle)
    except (NotImplementedError, AttributeError, RuntimeError):  # no SIGHUP here (Windows), or not main thread
        return lambda: None

    def remove() -> None:
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(signal.SIGHUP)

    return remove
