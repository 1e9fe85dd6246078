"""The micro-batcher on a scripted runner: order, batching, limits, cancelling, isolation, shutdown.

The runner can hold the worker inside a forward pass (``hold``), so a test queues calls behind it and knows
exactly what the next pass will find: no timing, no sleeps.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import pytest

from inhouse.engine.encoder.batcher import Batched, Batcher, BatchLimits
from inhouse.errors import ErrorCode, InhouseError

WAIT = 10.0  # seconds: only a bound on a broken run, never a synchronisation


@dataclass(frozen=True)
class Item:
    value: str
    size: int = 1
    refuse: bool = False  # prepare refuses it (as a too-long input is refused)
    poison: bool = False  # any pass that carries it raises


class ScriptedRunner:
    """Uppercases values; records every pass; can hold the worker inside a pass until released."""

    def __init__(self) -> None:
        self.passes: list[list[str]] = []
        self.prepared: list[str] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def prepare(self, inputs: Sequence[Item]) -> list[Item | InhouseError]:
        self.prepared.extend(item.value for item in inputs)
        return [InhouseError(ErrorCode.CONTEXT_LENGTH_EXCEEDED, f"{item.value} is too long", param="input")
                if item.refuse else item for item in inputs]

    def size(self, prepared: Item) -> int:
        return prepared.size

    def run(self, batch: Sequence[Item]) -> list[str]:
        self.passes.append([item.value for item in batch])
        self.entered.set()
        assert self.release.wait(WAIT)
        if any(item.poison for item in batch):
            raise RuntimeError("secret internal detail")
        return [item.value.upper() for item in batch]


Make = Callable[..., tuple[Batcher[Item, Item, str], ScriptedRunner]]


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    made: list[Batcher[Item, Item, str]] = []

    def build(max_batch: int = 64, max_batch_tokens: int = 10_000, batch_wait: float = 0.0,
              max_waiting: int = 100) -> tuple[Batcher[Item, Item, str], ScriptedRunner]:
        runner = ScriptedRunner()
        batcher: Batcher[Item, Item, str] = Batcher(
            runner, BatchLimits(max_batch, max_batch_tokens, batch_wait, max_waiting), "scripted")
        batcher.start()
        made.append(batcher)
        return batcher, runner

    yield build
    for batcher in made:
        await batcher.close()


async def hold(batcher: Batcher[Item, Item, str], runner: ScriptedRunner) -> asyncio.Task[Batched[str]]:
    """Put the worker inside a pass (of one input, "blocker") and keep it there until ``runner.release``."""
    runner.release.clear()
    runner.entered.clear()
    blocker = asyncio.create_task(batcher.submit([Item("blocker")]))
    assert await asyncio.to_thread(runner.entered.wait, WAIT)
    return blocker


async def queued(batcher: Batcher[Item, Item, str], calls: list[list[Item]]) -> list[asyncio.Task[Batched[str]]]:
    """Start the calls and let each reach its await (each queues its inputs before its first await)."""
    tasks = [asyncio.create_task(batcher.submit(call)) for call in calls]
    await asyncio.sleep(0)  # one loop turn: every new task runs up to its await
    assert batcher.stats().waiting == sum(len(call) for call in calls)
    return tasks


async def outcome(task: asyncio.Task[Batched[str]]) -> Batched[str] | InhouseError:
    try:
        return await task
    except InhouseError as exc:
        return exc


async def test_rows_come_back_in_input_order_with_their_tokens(make: Make) -> None:
    batcher, _ = make()
    items = [Item("long", 5), Item("a", 1), Item("mid", 3), Item("b", 2)]
    result = await batcher.submit(items)
    assert result.rows == ["LONG", "A", "MID", "B"]
    assert result.tokens == 11


async def test_calls_queued_behind_a_pass_share_the_next_one(make: Make) -> None:
    batcher, runner = make(max_batch=16)
    blocker = await hold(batcher, runner)
    assert batcher.stats().running == 1
    tasks = await queued(batcher, [[Item(f"t{i}")] for i in range(16)])
    runner.release.set()
    results = await asyncio.gather(*tasks)
    assert [r.rows for r in results] == [[f"T{i}"] for i in range(16)]
    assert (await blocker).rows == ["BLOCKER"]
    stats = batcher.stats()
    assert stats.batches == 2 and stats.max_batch == 16 and stats.batched_inputs == 17
    assert stats.running == 0 and stats.waiting == 0


async def test_an_idle_worker_waits_for_company(make: Make) -> None:
    """16 concurrent single-input calls on an idle engine: the first waits (up to 30 s, ended early when a
    full batch has queued) for the others, so they run in fewer than 16 passes."""
    batcher, runner = make(max_batch=16, batch_wait=30.0)
    results = await asyncio.gather(*(batcher.submit([Item(f"c{i}")]) for i in range(16)))
    assert [r.rows[0] for r in results] == [f"C{i}" for i in range(16)]
    stats = batcher.stats()
    assert stats.batches < 16 and stats.max_batch > 1
    assert len(runner.passes) == stats.batches


async def test_a_pass_keeps_to_the_token_budget_and_groups_similar_lengths(make: Make) -> None:
    batcher, runner = make(max_batch=8, max_batch_tokens=40)
    sizes = [10, 10, 30, 10, 5, 10, 100, 5, 20, 1, 1]
    blocker = await hold(batcher, runner)
    tasks = await queued(batcher, [[Item(f"s{i}", size)] for i, size in enumerate(sizes)])
    runner.release.set()
    results = await asyncio.gather(*tasks)
    await blocker
    assert [r.tokens for r in results] == sizes
    size_of = {f"s{i}": size for i, size in enumerate(sizes)}
    passes = runner.passes[1:]  # after the blocker's
    assert sorted(v for p in passes for v in p) == sorted(size_of)
    for batch in passes:
        assert len(batch) == 1 or len(batch) * max(size_of[v] for v in batch) <= 40, batch
    assert ["s6"] in passes  # longer than the budget alone: it still runs, alone
    assert sorted(passes[0]) == ["s0", "s1", "s3", "s5"]  # the oldest, with the inputs of its length


async def test_a_cancelled_caller_has_its_queued_inputs_dropped(make: Make) -> None:
    batcher, runner = make()
    blocker = await hold(batcher, runner)
    gone, kept = await queued(batcher, [[Item("x"), Item("y"), Item("z")], [Item("k")]])
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert batcher.stats().waiting == 1
    runner.release.set()
    assert (await kept).rows == ["K"]
    await blocker
    ran = [v for p in runner.passes for v in p]
    assert not {"x", "y", "z"} & set(ran)
    assert ran == ["blocker", "k"]


async def test_a_full_queue_is_429_and_a_call_that_can_never_fit_is_400(make: Make) -> None:
    batcher, runner = make(max_batch=1, max_waiting=2)  # 3 inputs in progress at most
    blocker = await hold(batcher, runner)
    (pending,) = await queued(batcher, [[Item("p"), Item("q")]])
    with pytest.raises(InhouseError) as full:
        await batcher.submit([Item("r")])
    assert full.value.code is ErrorCode.QUEUE_FULL and full.value.status == 429
    assert full.value.retry_after is not None and full.value.retry_after > 0
    with pytest.raises(InhouseError) as never:
        await batcher.submit([Item(str(i)) for i in range(4)], param="documents")
    assert never.value.code is ErrorCode.INVALID_REQUEST and never.value.param == "documents"
    assert "3" in never.value.message
    runner.release.set()
    assert (await pending).rows == ["P", "Q"]
    await blocker
    assert (await batcher.submit([Item("r")])).rows == ["R"]  # room again


async def test_an_input_that_fails_the_model_fails_its_call_alone(make: Make) -> None:
    batcher, runner = make()
    blocker = await hold(batcher, runner)
    calls = [[Item("a")], [Item("ok"), Item("bad", poison=True)], [Item("b"), Item("c")]]
    first, poisoned, last = await queued(batcher, calls)
    runner.release.set()
    assert (await first).rows == ["A"]
    assert (await last).rows == ["B", "C"]
    failed = await outcome(poisoned)
    assert isinstance(failed, InhouseError) and failed.code is ErrorCode.ENGINE_ERROR and failed.status == 500
    assert "input 1" in failed.message and "secret" not in failed.message
    await blocker
    assert sorted(runner.passes[1]) == ["a", "b", "bad", "c", "ok"]  # one batched pass, then each alone


async def test_an_input_refused_while_prepared_fails_its_call_and_drops_the_rest_of_it(make: Make) -> None:
    batcher, runner = make()
    blocker = await hold(batcher, runner)
    refused, fine = await queued(batcher, [[Item("keep-out"), Item("long", refuse=True)], [Item("fine")]])
    runner.release.set()
    error = await outcome(refused)
    assert isinstance(error, InhouseError) and error.code is ErrorCode.CONTEXT_LENGTH_EXCEEDED
    assert (await fine).rows == ["FINE"]
    await blocker
    assert "keep-out" not in [v for p in runner.passes for v in p]


async def test_close_finishes_the_running_pass_and_fails_the_queued_calls(make: Make) -> None:
    batcher, runner = make()
    blocker = await hold(batcher, runner)
    (waiting,) = await queued(batcher, [[Item("w")]])
    closing = asyncio.create_task(batcher.close())
    await asyncio.sleep(0)  # close() marks the batcher closing before it waits for the worker
    runner.release.set()
    await closing
    assert (await blocker).rows == ["BLOCKER"]
    error = await outcome(waiting)
    assert isinstance(error, InhouseError) and error.code is ErrorCode.MODEL_UNAVAILABLE
    with pytest.raises(InhouseError) as after:
        await batcher.submit([Item("late")])
    assert after.value.code is ErrorCode.MODEL_UNAVAILABLE
    assert "w" not in [v for p in runner.passes for v in p]
