"""Swapper in-process on FakeEngines: a swap switches new requests at once while an in-flight one finishes on
the old version; a failed smoke check, a load error or too little memory leave the old version serving;
a canary that errors is rolled back from the tallies the call-end sink feeds; rollback brings the previous
version back; reload adds, removes and swaps.  Versions come from ``version:`` or a checkpoint hash."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from inhouse.audit.record import AuditRecord
from inhouse.config import FakeSpec, ModelSpec, Settings, SwapSettings, TransformersSpec
from inhouse.engine.base import Engine, GenerateRequest, SamplingParams
from inhouse.engine.fake import FakeEngine
from inhouse.errors import ErrorCode, InhouseError
from inhouse.gateway.memory import memory_refusal
from inhouse.gateway.registry import Deployment, ModelRegistry
from inhouse.gateway.swap import Swapper
from inhouse.gateway.version import version_of

RULES = SwapSettings(drain_s=10, canary_window_s=0.3, canary_min_requests=3)


class _Broken(FakeEngine):
    async def start(self) -> None:
        from inhouse.engine.base import ModelLoadError

        raise ModelLoadError("config.json is not valid JSON")


def _build(spec: ModelSpec) -> Engine:
    assert isinstance(spec, FakeSpec)
    return _Broken(spec) if spec.fake_reply == "broken" else FakeEngine(spec)


@pytest.fixture
async def parts() -> AsyncIterator[tuple[ModelRegistry, Swapper]]:
    spec = FakeSpec(name="chat", fake_reply="old answer here", version="v1")
    registry = ModelRegistry([Deployment.new(spec, FakeEngine(spec))])
    registry.start_loading()
    await registry.wait_loaded()
    yield registry, Swapper(registry, RULES, _build)
    await registry.close()


async def _ask(registry: ModelRegistry) -> tuple[str, str]:
    """(version, whole answer) of one request to the current set."""
    deployment = registry.serving("chat")[0]
    assert isinstance(deployment.engine, FakeEngine)
    request = GenerateRequest(request_id="r", sampling=SamplingParams(max_tokens=16), prompt="hi")
    text = [d.text for g in await deployment.engine.submit([request]) async for d in g]
    return deployment.version, "".join(text)


async def test_a_swap_switches_to_the_new_version_and_remembers_the_old(parts: tuple[ModelRegistry, Swapper]) -> None:
    registry, swapper = parts
    old = registry.get("chat")
    result = await swapper.swap("chat", {"fake_reply": "new answer", "version": "v2"})
    assert (result["from"], result["to"], result["outcome"]) == ("v1", "v2", "swapped")
    assert await _ask(registry) == ("v2", "new answer")
    assert old.engine.state.value == "closed"
    assert swapper.status("chat")["previous_versions"] == 1
    back = await swapper.rollback("chat")
    assert (back["to"], back["kind"]) == ("v1", "rollback")
    assert await _ask(registry) == ("v1", "old answer here")


async def test_a_failed_load_or_smoke_check_keeps_the_old_version(parts: tuple[ModelRegistry, Swapper]) -> None:
    registry, swapper = parts
    with pytest.raises(InhouseError) as failed:
        await swapper.swap("chat", {"fake_reply": "broken", "version": "v2"})
    assert failed.value.code is ErrorCode.SWAP_FAILED
    assert "config.json is not valid JSON" in failed.value.message and "v1 keeps serving" in failed.value.message
    with pytest.raises(InhouseError, match="does not contain 'banana'"):
        await swapper.swap("chat", {"version": "v3", "smoke": {"expect": ["banana"]}})
    assert await _ask(registry) == ("v1", "old answer here")
    assert swapper.status("chat")["last_swap"]["outcome"] == "failed"


@pytest.mark.parametrize("value", ["yes", "true", 1, 0.0, [True]])
async def test_a_swap_takes_only_true_or_false_for_a_boolean(parts: tuple[ModelRegistry, Swapper],
                                                             value: object) -> None:
    """Admin bodies are strict (issue 8): ``"yes"`` is not coerced to true, as it would be in a config file."""
    registry, swapper = parts
    with pytest.raises(InhouseError) as refused:
        await swapper.swap("chat", {"clamp_max_tokens": value, "version": "v2"})
    assert refused.value.code is ErrorCode.INVALID_REQUEST and refused.value.param == "clamp_max_tokens"
    assert "true or false" in refused.value.message
    assert await _ask(registry) == ("v1", "old answer here")


async def test_a_canary_that_errors_is_rolled_back(parts: tuple[ModelRegistry, Swapper]) -> None:
    registry, swapper = parts

    async def traffic() -> None:  # what the call-end sink would report: the canary's calls fail
        while True:
            deployment = registry.serving("chat")[0]
            failed = deployment.version == "v2"
            await swapper.observe(AuditRecord(at=0, request_id="r", method="POST", path="/v1/chat/completions",
                                              status=200, served_model="chat", model_version=deployment.version,
                                              error_code="engine_error" if failed else None, ttft_ms=5.0))
            await asyncio.sleep(0.002)

    task = asyncio.create_task(traffic())
    try:
        result = await swapper.swap("chat", {"version": "v2", "fake_fail_after": 8}, canary=0.5)
    finally:
        task.cancel()
    assert result["outcome"] == "rolled_back", result
    assert "error rate" in result["reason"] and result["canary"]["errors"] > 0
    assert registry.get("chat").version == "v1" and registry.canary("chat") == []
    assert swapper.status("chat")["previous_versions"] == 0


async def test_a_healthy_canary_is_promoted(parts: tuple[ModelRegistry, Swapper]) -> None:
    registry, swapper = parts

    async def traffic() -> None:
        while True:
            d = registry.serving("chat")[0]
            await swapper.observe(AuditRecord(at=0, request_id="r", method="POST", path="/", status=200,
                                              served_model="chat", model_version=d.version, ttft_ms=5.0))
            await asyncio.sleep(0.002)

    task = asyncio.create_task(traffic())
    try:
        result = await swapper.swap("chat", {"version": "v2"}, canary=0.5)
    finally:
        task.cancel()
    assert result["outcome"] == "promoted", result
    assert registry.get("chat").version == "v2"


async def test_reload_adds_removes_and_swaps(parts: tuple[ModelRegistry, Swapper]) -> None:
    registry, swapper = parts
    settings = Settings(models=(FakeSpec(name="chat", fake_reply="reloaded", version="v9"),
                                FakeSpec(name="extra")))
    report = await swapper.reload(settings)
    assert (report["swapped"], report["added"]) == (["chat"], ["extra"])
    assert await _ask(registry) == ("v9", "reloaded")
    report = await swapper.reload(Settings(models=(FakeSpec(name="extra"),)))
    assert report["removed"] == ["chat"] and registry.names() == ["extra"]


def test_the_version_is_the_label_or_a_checkpoint_hash(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    spec = TransformersSpec(name="m", path=str(tmp_path))
    first = version_of(spec)
    assert first.startswith("v-") and version_of(spec) == first
    (tmp_path / "model.safetensors").write_bytes(b"x" * 11)
    assert version_of(spec) != first
    assert version_of(spec.model_copy(update={"version": "prod-7"})) == "prod-7"


def test_a_swap_that_would_not_fit_is_refused_with_the_numbers(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with (tmp_path / "model.safetensors").open("wb") as f:
        f.truncate(1 << 40)  # a sparse tebibyte: no disk used, more than any machine's memory
    refusal = memory_refusal([TransformersSpec(name="m", path=str(tmp_path), device="cpu")])
    assert refusal is not None and "GiB" in refusal and "available" in refusal
    os.unlink(tmp_path / "model.safetensors")
    assert memory_refusal([TransformersSpec(name="m", path=str(tmp_path), device="cpu")]) is None
