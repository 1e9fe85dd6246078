"""The hand-off object merges what a slow consumer has not read yet, across threads."""

from __future__ import annotations

import asyncio
import threading

import pytest

from inhouse.engine.base import Delta
from inhouse.engine.collector import OutputCollector


def test_items_from_another_thread_arrive_merged_in_order() -> None:
    async def run() -> str:
        collector: OutputCollector[Delta] = OutputCollector(asyncio.get_running_loop())

        def produce() -> None:
            for i in range(200):
                collector.put(Delta(text=str(i % 10), token_count=1))
            collector.put(Delta(text="!", token_count=1, finish_reason="stop"))

        thread = threading.Thread(target=produce)
        thread.start()
        text, tokens = "", 0
        while True:
            delta = await collector.get()
            text += delta.text
            tokens += delta.token_count
            if delta.finish_reason:
                break
        thread.join()
        assert tokens == 201
        return text

    assert asyncio.run(run()) == "0123456789" * 20 + "!"


def test_failure_is_raised_after_pending_output() -> None:
    async def run() -> None:
        collector: OutputCollector[Delta] = OutputCollector(asyncio.get_running_loop())
        collector.put(Delta(text="partial"))
        collector.fail(RuntimeError("boom"))
        assert (await collector.get()).text == "partial"
        with pytest.raises(RuntimeError):
            await collector.get()

    asyncio.run(run())
