"""LoRA adapters in the transformers engine, in-process on the tiny model: PEFT's own greedy answers, token for
token, for each adapter alone and for four adapters plus the bare base mixed in one batch."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from inhouse.config import AdapterSpec, TransformersSpec
from inhouse.engine.adapter import AdapterEngine
from inhouse.engine.base import GenerateRequest, Generation, ModelLoadError, SamplingParams
from inhouse.engine.local.engine import LocalEngine
from inhouse.engine.local.lora import AdapterError, read_adapter
from inhouse.errors import ErrorCode, InhouseError
from tests.tiny_lora import RECIPES, build_adapter, peft_greedy

TOKENS = 12
PROMPTS = ([5, 17, 99, 230, 41], [300, 12, 7], [88, 88, 150, 420, 9, 61, 3], [250, 4])


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, cache_dir: Path) -> dict[str, Path]:
    return {r.name: build_adapter(tiny_model_dir, r, cache_dir / f"tiny-lora-{r.name}") for r in RECIPES}


@pytest.fixture(scope="module")
async def engine(tiny_model_dir: Path, cache_dir: Path, adapters: dict[str, Path]) -> AsyncIterator[LocalEngine]:
    spec = TransformersSpec(name="tiny", path=str(tiny_model_dir), dtype="float32", max_num_seqs=8, max_waiting=8)
    engine = LocalEngine(spec, cache_dir)
    await engine.start()
    for name, path in adapters.items():
        await engine.load_adapter(name, path)
    yield engine
    await engine.close()


def request(i: int, prompt: list[int], adapter: str | None) -> GenerateRequest:
    sampling = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True, logprobs=True)
    return GenerateRequest(f"r{i}", sampling, prompt=tuple(prompt), adapter=adapter)


async def tokens_of(generation: Generation) -> list[str]:
    out: list[str] = []
    async for delta in generation:
        out += [lp.token for lp in delta.logprobs or []]
    return out


def texts(engine: LocalEngine, ids: list[int]) -> list[str]:
    assert engine._loaded is not None
    return [engine._loaded.tokenizer.decode([t]) for t in ids]


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
async def test_each_adapter_alone_equals_peft(engine: LocalEngine, tiny_model_dir: Path, adapters: dict[str, Path],
                                              recipe: object) -> None:
    name = recipe.name  # type: ignore[attr-defined]
    expected = peft_greedy(tiny_model_dir, adapters[name], PROMPTS[0], TOKENS)
    base = peft_greedy(tiny_model_dir, None, PROMPTS[0], TOKENS)
    assert expected != base, "the adapter has no visible effect: the test would prove nothing"
    [generation] = await engine.submit([request(0, PROMPTS[0], name)])
    assert await tokens_of(generation) == texts(engine, expected)


async def test_four_adapters_and_the_base_in_one_batch_equal_peft(
        engine: LocalEngine, tiny_model_dir: Path, adapters: dict[str, Path]) -> None:
    names: list[str | None] = [r.name for r in RECIPES] + [None]
    rows = [(names[i % len(names)], PROMPTS[i % len(PROMPTS)]) for i in range(8)]
    expected = [peft_greedy(tiny_model_dir, adapters[n] if n else None, p, TOKENS) for n, p in rows]
    assert engine.lora is not None
    engine.lora.most_mixed = 0
    generations = await engine.submit([request(i, p, n) for i, (n, p) in enumerate(rows)])
    got = await asyncio.gather(*(tokens_of(g) for g in generations))
    for (name, _), want, have in zip(rows, expected, got, strict=True):
        assert have == texts(engine, want), f"adapter {name}"
    assert engine.lora.most_mixed == 5  # four adapters and the bare base ran in the same forward passes


async def test_lru_keeps_max_loras_resident_and_reloads(tiny_model_dir: Path, cache_dir: Path,
                                                        adapters: dict[str, Path]) -> None:
    spec = TransformersSpec(name="tiny", path=str(tiny_model_dir), dtype="float32", max_num_seqs=4, max_loras=2)
    engine = LocalEngine(spec, cache_dir)
    await engine.start()
    try:
        for name, path in adapters.items():
            await engine.load_adapter(name, path)
        lora = engine.lora
        assert lora is not None
        assert len(lora.resident()) == 2
        assert len(lora.names()) == len(RECIPES)  # evicted from memory, still registered
        first = RECIPES[0].name
        assert first not in lora.resident()
        loads = lora.loads
        [generation] = await engine.submit([request(0, PROMPTS[1], first)])
        want = peft_greedy(tiny_model_dir, adapters[first], PROMPTS[1], TOKENS)
        assert await tokens_of(generation) == texts(engine, want)
        assert lora.loads == loads + 1  # read back from disk
        assert first in lora.resident()
        assert len(lora.resident()) == 2
    finally:
        await engine.close()


async def test_an_unknown_adapter_is_404(engine: LocalEngine) -> None:
    with pytest.raises(InhouseError) as caught:
        await engine.submit([request(0, PROMPTS[0], "nope")])
    assert caught.value.code is ErrorCode.MODEL_NOT_FOUND


async def test_a_wrong_shape_adapter_names_the_module(engine: LocalEngine, adapters: dict[str, Path],
                                                      tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    source = adapters["lora-qv"]
    (tmp_path / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
    tensors = load_file(str(source / "adapter_model.safetensors"))
    key = next(k for k in tensors if "layers.1.self_attn.v_proj.lora_A" in k)
    tensors[key] = torch.zeros(4, 96)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    assert engine._loaded is not None
    with pytest.raises(AdapterError, match=r"model\.layers\.1\.self_attn\.v_proj: lora_A \(4, 96\)"):
        read_adapter("bad", tmp_path, engine._loaded.model, torch.float32, torch.device("cpu"))
    bad = AdapterEngine(AdapterSpec(name="bad", base="tiny", adapter=str(tmp_path)), engine)
    with pytest.raises(ModelLoadError, match="v_proj"):
        await bad.start()
    assert not any(n.startswith("bad") for n in engine.lora.names())  # type: ignore[union-attr]


async def test_an_adapter_engine_serves_its_requests_with_its_adapter(
        engine: LocalEngine, tiny_model_dir: Path, adapters: dict[str, Path]) -> None:
    served = AdapterEngine(AdapterSpec(name="qv-again", base="tiny", adapter=str(adapters["lora-qv"])), engine)
    await served.start()
    assert served.key in engine.lora.names()  # type: ignore[union-attr]
    [generation] = await served.submit([request(0, PROMPTS[2], None)])
    want = peft_greedy(tiny_model_dir, adapters["lora-qv"], PROMPTS[2], TOKENS)
    assert await tokens_of(generation) == texts(engine, want)
    await served.close()
    assert served.key not in engine.lora.names()  # type: ignore[union-attr]
    with pytest.raises(InhouseError):
        await served.submit([request(1, PROMPTS[2], None)])


async def test_a_missing_adapter_dir_says_the_path(engine: LocalEngine, tmp_path: Path) -> None:
    bad = AdapterEngine(AdapterSpec(name="gone", base="tiny", adapter=str(tmp_path / "gone")), engine)
    with pytest.raises(ModelLoadError, match=str(tmp_path / "gone")):
        await bad.start()


async def test_a_request_running_when_its_adapter_is_unloaded_still_finishes_with_it(
        engine: LocalEngine, tiny_model_dir: Path, adapters: dict[str, Path]) -> None:
    await engine.load_adapter("leaving", adapters["lora-mlp"])
    [generation] = await engine.submit([request(0, PROMPTS[3], "leaving")])
    engine.unload_adapter("leaving")
    with pytest.raises(InhouseError):  # new requests: refused
        await engine.submit([request(1, PROMPTS[3], "leaving")])
    want = peft_greedy(tiny_model_dir, adapters["lora-mlp"], PROMPTS[3], TOKENS)
    assert await tokens_of(generation) == texts(engine, want)
