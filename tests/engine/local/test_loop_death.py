"""The transformers engine whose loop thread dies: it says so through the seam (FAILED, ``stats().alive``
False), fails what it held, and refuses new work, so the server's liveness probe can fail.

The loop is killed the only way a real one dies: something it cannot handle reaches it.  Here that is an
object that is not a sequence, put in its inbox (no caller can do that; a bug could).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from inhouse.config import TransformersSpec
from inhouse.engine.base import EngineState, GenerateRequest, SamplingParams
from inhouse.engine.local.engine import LocalEngine
from inhouse.errors import ErrorCode, InhouseError

HI = ({"role": "user", "content": "hello"},)


def long_request(name: str) -> GenerateRequest:
    return GenerateRequest(name, SamplingParams(max_tokens=400, ignore_eos=True), messages=HI)


async def test_a_dead_loop_fails_its_requests_and_the_engine(tiny_model_dir: Path, cache_dir: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    engine = LocalEngine(TransformersSpec(name="tiny", path=str(tiny_model_dir), dtype="float32"), cache_dir)
    await engine.start()
    try:
        assert engine.state is EngineState.READY and engine.stats().alive
        generation = (await engine.submit([long_request("victim")]))[0]
        with engine._lock:  # the poison: not a Sequence
            engine._inbox.append(object())  # type: ignore[arg-type]
            engine._wakeup.notify()
        with pytest.raises(InhouseError):
            async for _ in generation:
                pass
        for _ in range(500):
            if not engine.stats().alive:
                break
            await asyncio.sleep(0.01)
        assert not engine.stats().alive
        assert engine.state is EngineState.FAILED and engine.stats().state is EngineState.FAILED
        with pytest.raises(InhouseError) as refused:
            await engine.submit([long_request("late")])
        assert refused.value.code is ErrorCode.MODEL_UNAVAILABLE
        assert any("engine loop of model tiny died" in r.getMessage() for r in caplog.records)
    finally:
        await engine.close()
    assert engine.state is EngineState.CLOSED
