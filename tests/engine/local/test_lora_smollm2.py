"""LoRA on the real SmolLM2-135M-Instruct (bf16, the embedded default): the transformers engine's greedy tokens
equal PEFT's own ``PeftModel.generate`` for each adapter alone (bf16), and with two adapters and the base batched
(float32: in bf16 a batched row is rounded differently from a lone ``generate`` whatever its adapter, base rows
too, and near-ties in SmolLM2's bf16 logits then flip; the engine promises bit-equality in bf16 for a lone
sequence only, see inhouse/engine/local/attention.py).  The engine here multiplies with oneDNN (``linear_kernel:
false``), as PEFT's ``generate`` does: the compiled linear kernel's bits are its own (test_linears.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from inhouse.config import TransformersSpec
from inhouse.engine.base import GenerateRequest, Generation, SamplingParams
from inhouse.engine.checkpoint import resolve_checkpoint
from inhouse.engine.local.engine import LocalEngine
from tests.tiny_lora import AdapterRecipe, build_adapter, peft_greedy

pytestmark = pytest.mark.slow

TOKENS = 24
RECIPES = (
    AdapterRecipe("smol-qv", 8, 16, ("q_proj", "v_proj"), 11),
    AdapterRecipe("smol-mlp", 16, 16, ("gate_proj", "up_proj", "down_proj"), 12, rslora=True),
)
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def checkpoint(cache_dir: Path) -> Path:
    spec = TransformersSpec(name="smol", path="builtin:smollm2-135m-instruct")
    return resolve_checkpoint(spec, cache_dir)


@pytest.fixture(scope="module")
def adapters(checkpoint: Path, cache_dir: Path) -> dict[str, Path]:
    return {r.name: build_adapter(checkpoint, r, cache_dir / f"smollm2-lora-{r.name}") for r in RECIPES}


@pytest.fixture(scope="module")
async def engine(checkpoint: Path, cache_dir: Path, adapters: dict[str, Path]) -> AsyncIterator[LocalEngine]:
    spec = TransformersSpec(name="smol", path=str(checkpoint), dtype="bfloat16", max_num_seqs=4, linear_kernel=False)
    engine = LocalEngine(spec, cache_dir)
    await engine.start()
    for name, path in adapters.items():
        await engine.load_adapter(name, path)
    yield engine
    await engine.close()


def prompt_ids(engine: LocalEngine) -> list[int]:
    assert engine._loaded is not None
    return list(engine._loaded.tokenizer(PROMPT)["input_ids"])


def request(i: int, prompt: list[int], adapter: str | None) -> GenerateRequest:
    sampling = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True, logprobs=True)
    return GenerateRequest(f"s{i}", sampling, prompt=tuple(prompt), adapter=adapter)


async def tokens_of(generation: Generation) -> list[str]:
    return [lp.token async for delta in generation for lp in (delta.logprobs or [])]


def texts(engine: LocalEngine, ids: list[int]) -> list[str]:
    assert engine._loaded is not None
    return [engine._loaded.tokenizer.decode([t]) for t in ids]


@pytest.mark.parametrize("name", [r.name for r in RECIPES])
async def test_each_adapter_alone_equals_peft_on_smollm2(engine: LocalEngine, checkpoint: Path,
                                                         adapters: dict[str, Path], name: str) -> None:
    prompt = prompt_ids(engine)
    want = peft_greedy(checkpoint, adapters[name], prompt, TOKENS, dtype=torch.bfloat16)
    assert want != peft_greedy(checkpoint, None, prompt, TOKENS, dtype=torch.bfloat16)
    [generation] = await engine.submit([request(0, prompt, name)])
    assert await tokens_of(generation) == texts(engine, want)


async def test_two_adapters_and_the_base_batched_equal_peft_on_smollm2(
        checkpoint: Path, cache_dir: Path, adapters: dict[str, Path]) -> None:
    engine = LocalEngine(TransformersSpec(name="smol32", path=str(checkpoint), dtype="float32", max_num_seqs=4),
                         cache_dir)
    await engine.start()
    try:
        for name, path in adapters.items():
            await engine.load_adapter(name, path)
        prompt = prompt_ids(engine)
        rows: list[str | None] = [r.name for r in RECIPES] + [None]
        expected = [peft_greedy(checkpoint, adapters[n] if n else None, prompt, TOKENS, dtype=torch.float32)
                    for n in rows]
        assert engine.lora is not None
        engine.lora.most_mixed = 0
        generations = await engine.submit([request(i, prompt, n) for i, n in enumerate(rows)])
        got = await asyncio.gather(*(tokens_of(g) for g in generations))
        for name, want, have in zip(rows, expected, got, strict=True):
            assert have == texts(engine, want), name
        assert engine.lora.most_mixed == 3
    finally:
        await engine.close()
