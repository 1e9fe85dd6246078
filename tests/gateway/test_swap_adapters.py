"""A swap of a base model carries its LoRA adapters (declared and loaded at runtime) to the new version, in
process on the tiny model's transformers engine: after the swap each adapter runs on the new base engine and
answers as before, and the old base is closed; a canary of a base with adapters is refused, the old version
serving on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from inhouse.config import AdapterSpec, ModelSpec, Settings, SwapSettings, TransformersSpec
from inhouse.engine.adapter import AdapterEngine
from inhouse.engine.base import Engine, EngineState, GenerateRequest, SamplingParams
from inhouse.engine.factory import build_engine, build_engines
from inhouse.errors import ErrorCode, InhouseError
from inhouse.gateway.adapters import Adapters
from inhouse.gateway.registry import ModelRegistry
from inhouse.gateway.swap import Swapper
from tests.tiny_lora import RECIPES, build_adapter

RULES = SwapSettings(drain_s=10)


@pytest.fixture
async def parts(tiny_model_dir: Path, cache_dir: Path) -> AsyncIterator[tuple[ModelRegistry, Swapper, Path]]:
    paths = {r.name: build_adapter(tiny_model_dir, r, cache_dir / f"tiny-lora-{r.name}") for r in RECIPES[:2]}
    specs: list[ModelSpec] = [TransformersSpec(name="tiny", path=str(tiny_model_dir), dtype="float32", version="v1"),
                              AdapterSpec(name="lora-qv", base="tiny", adapter=str(paths["lora-qv"]))]
    registry = ModelRegistry.of(build_engines(specs, cache_dir))
    registry.start_loading()
    await registry.wait_loaded()

    def build(spec: ModelSpec) -> Engine:
        return build_engine(spec, cache_dir, [(d.spec, d.engine) for d in registry.all()])

    yield registry, Swapper(registry, RULES, build), paths["lora-mlp"]
    await registry.close()


async def answer(registry: ModelRegistry, model: str) -> str:
    engine = registry.find(model)[0].engine
    sampling = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    generations = await engine.submit([GenerateRequest("r", sampling, prompt=(5, 17, 99, 230, 41))])  # type: ignore[attr-defined]
    return "".join([d.text async for d in generations[0]])


async def test_a_base_swap_carries_its_adapters_to_the_new_version(
        parts: tuple[ModelRegistry, Swapper, Path]) -> None:
    registry, swapper, runtime_adapter = parts
    await Adapters(registry).load("lora-mlp", "tiny", str(runtime_adapter), None)
    before = {m: await answer(registry, m) for m in ("tiny", "lora-qv", "lora-mlp")}
    assert len(set(before.values())) == 3  # the adapters change the answer
    old_base = registry.find("tiny")[0].engine
    result = await swapper.swap("tiny", {"version": "v2"})
    assert result["outcome"] == "swapped" and result["to"] == "v2"
    new_base = registry.find("tiny")[0].engine
    assert new_base is not old_base and old_base.state is EngineState.CLOSED
    for name in ("lora-qv", "lora-mlp"):
        engine = registry.find(name)[0].engine
        assert isinstance(engine, AdapterEngine) and engine.base is new_base and engine.state is EngineState.READY
    assert {m: await answer(registry, m) for m in before} == before
    assert {a["name"] for a in Adapters(registry).list()} == {"lora-qv", "lora-mlp"}


async def test_a_canary_of_a_base_with_adapters_is_refused(parts: tuple[ModelRegistry, Swapper, Path]) -> None:
    registry, swapper, _ = parts
    old_base = registry.find("tiny")[0].engine
    with pytest.raises(InhouseError) as info:
        await swapper.swap("tiny", {"version": "v2"}, canary=0.5)
    assert info.value.code is ErrorCode.SWAP_FAILED and "canary of a base with LoRA adapters" in info.value.message
    assert registry.find("tiny")[0].engine is old_base and old_base.state is EngineState.READY


async def test_a_reload_keeps_runtime_adapters_over_a_kept_base_and_drops_those_over_a_removed_one(
        parts: tuple[ModelRegistry, Swapper, Path], tiny_model_dir: Path) -> None:
    """The config file rules the models it declares; an adapter loaded at runtime is not in it, so a reload
    (SIGHUP, say) must not drop it while its base stays, and must not leave it over a closed base either."""
    registry, swapper, runtime_adapter = parts
    await Adapters(registry).load("lora-mlp", "tiny", str(runtime_adapter), None)
    before = await answer(registry, "lora-mlp")
    base = TransformersSpec(name="tiny", path=str(tiny_model_dir), dtype="float32", version="v1")
    kept = await swapper.reload(Settings(models=[base]))  # lora-qv, declared, is gone from the file
    assert kept["removed"] == ["lora-qv"] and kept["kept"] == ["lora-mlp"] and kept["unchanged"] == ["tiny"]
    assert await answer(registry, "lora-mlp") == before
    other = TransformersSpec(name="other", path=str(tiny_model_dir), dtype="float32")
    gone = await swapper.reload(Settings(models=[other]))  # now the base goes too: its adapter goes with it
    assert set(gone["removed"]) == {"tiny", "lora-mlp"} and gone["kept"] == []
    assert registry.find("lora-mlp") == [] and registry.find("tiny") == []
