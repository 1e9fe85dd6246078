"""Torch work in passing threads (inhouse/engine/threads.py): the result or the error comes back, and no OpenMP
worker thread outlives the work, where a thread that stays alive keeps its team (what slowed the generating
engine beside an embedding model).  Counted as the process's native threads (``/proc/self/task``) that are not
Python threads."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from inhouse.config import SentenceTransformersSpec
from inhouse.engine.base import EmbedRequest
from inhouse.engine.encoder.engine import EncoderEngine
from inhouse.engine.threads import in_passing_thread, run_in_passing_thread


def native_threads() -> int:
    return len(os.listdir("/proc/self/task")) - threading.active_count()


def steady_count() -> int:
    """The native thread count once it has stopped moving (workers of earlier work may still be leaving)."""
    deadline = time.monotonic() + 5
    count = native_threads()
    while time.monotonic() < deadline:
        time.sleep(0.3)
        if (now := native_threads()) == count:
            return count
        count = now
    return count


def settles_at(count: int) -> bool:
    """The native thread count comes to ``count`` within 5 s (a team's workers leave soon after their thread)."""
    deadline = time.monotonic() + 5
    while native_threads() != count:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def parallel_work() -> float:
    """Big enough for torch to run it on every core (an OpenMP team)."""
    return float((torch.ones(800, 800) @ torch.ones(800, 800)).sum())


def needs_teams() -> None:
    """On one core (``taskset -c 0``) torch starts no OpenMP team: there is nothing to count.  (Asking it for two
    threads would not do: ``torch.set_num_threads`` itself leaves a native thread behind.)"""
    if torch.get_num_threads() == 1:
        pytest.skip("one core: torch starts no OpenMP team, so no worker thread can be left behind")


def test_the_result_and_the_error_come_back_and_the_thread_is_gone() -> None:
    before = threading.active_count()
    assert run_in_passing_thread(lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(ZeroDivisionError):
        run_in_passing_thread(lambda: 1 / 0)
    assert threading.active_count() == before


async def test_the_awaitable_form_gives_the_result_and_the_error() -> None:
    assert await in_passing_thread(sum, [1, 2, 3]) == 6
    with pytest.raises(KeyError):
        await in_passing_thread({}.__getitem__, "missing")


def test_parallel_torch_work_leaves_no_worker_behind_where_a_living_thread_keeps_its_team() -> None:
    needs_teams()
    baseline = steady_count()
    assert run_in_passing_thread(parallel_work) == 800.0**3
    assert settles_at(baseline)
    done, leave = threading.Event(), threading.Event()

    def living() -> None:
        parallel_work()
        done.set()
        leave.wait()

    thread = threading.Thread(target=living)
    thread.start()
    try:
        done.wait()
        assert not settles_at(baseline), "the control: a living thread that ran torch work keeps its team"
    finally:
        leave.set()
        thread.join()
    assert settles_at(baseline)


@pytest.mark.slow
async def test_an_embedding_model_keeps_no_team_between_batches(cache_dir: Path) -> None:
    """Its batches run in passing threads: once a batch is done, no worker of it is left to slow the generating
    engine's own team."""
    needs_teams()
    engine = EncoderEngine(SentenceTransformersSpec(name="emb", path="builtin:all-minilm-l6-v2"), cache_dir)
    await engine.start()
    try:
        assert engine._model is not None
        engine._model.tokenizer(["warm up"] * 64)  # the tokenizers library's own thread pool starts on a first batch
        baseline = steady_count()
        await engine.embed(EmbedRequest("e", tuple(["the quick brown fox jumps over the lazy dog " * 20] * 16)))
        assert settles_at(baseline)
    finally:
        await engine.close()
