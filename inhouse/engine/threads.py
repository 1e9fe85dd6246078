"""Torch work off an engine's own loop, in a thread that ends when the work does.

Owns ``in_passing_thread`` (awaitable) and ``run_in_passing_thread`` (blocking).  torch's CPU build runs its
parallel regions on OpenMP (libgomp), which gives every thread that starts one a team of worker threads of its
own, kept until that thread exits.  While more such threads are alive than the machine has cores, libgomp makes
every team's workers sleep almost at once between regions, and waking them costs each small op tens of
microseconds: measured here, one decode-sized bf16 linear layer took 0.025 ms, 0.080 ms while another thread
that had once run torch work was alive (idle), and 0.023 ms again after it exited; a 2,000-token prefill of
SmolLM2 took 1.2 s alone and 1.6 s beside an idle embedding model's thread.  So the one long-lived thread that
runs torch work is a generating engine's own loop; loading a model, warming it up and an embedding batch run in a
thread of their own that ends with them (starting one costs ~0.1 ms, an embedding batch takes milliseconds).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["in_passing_thread", "run_in_passing_thread"]

T = TypeVar("T")


def _start(fn: Callable[..., T], args: tuple[Any, ...], name: str) -> tuple[concurrent.futures.Future[T],
                                                                             threading.Thread]:
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the caller, who raises it
            future.set_exception(exc)
        else:
            future.set_result(result)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return future, thread


async def in_passing_thread(fn: Callable[..., T], *args: Any, name: str = "torch-work") -> T:
    """``await asyncio.to_thread(fn, *args)``, but in a new thread that ends with ``fn`` (not a pooled one that
    would keep an OpenMP team alive)."""
    future, _ = _start(fn, args, name)
    return await asyncio.wrap_future(future)


def run_in_passing_thread(fn: Callable[..., T], *args: Any, name: str = "torch-work") -> T:
    """``fn(*args)`` in a new thread that has ended by the time this returns (or raises what ``fn`` raised)."""
    future, thread = _start(fn, args, name)
    thread.join()
    return future.result()
