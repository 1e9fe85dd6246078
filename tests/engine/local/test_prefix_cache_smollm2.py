"""The prefix cache on the real SmolLM2-135M-Instruct (bf16, the embedded default): the same greedy answers with
the cache as without it, for a knowledge-assistant context asked several questions, one after the other and all
at once, for an adapter over the same context, and under a budget that forces evictions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from inhouse.config import TransformersSpec
from inhouse.engine.base import GenerateRequest, Generation, SamplingParams
from inhouse.engine.checkpoint import resolve_checkpoint
from inhouse.engine.local.engine import LocalEngine
from inhouse.engine.local.prefix_cache import BLOCK
from tests.tiny_lora import AdapterRecipe, build_adapter

pytestmark = pytest.mark.slow

TOKENS = 16
ADAPTER = AdapterRecipe("smol-qv", 8, 16, ("q_proj", "v_proj"), 11)
CONTEXT = ("You are the support assistant of Acme Logistics. Answer only from the context.\n\nContext:\n" + " ".join(
    f"Passage {i}: parcels from warehouse {i % 7} leave at {6 + i % 9}:00 and delays are reported within "
    f"{2 + i % 4} hours." for i in range(14)))
QUESTIONS = ("When do parcels leave warehouse 3?", "How fast are delays reported?", "What is passage 5 about?",
             "Who are you?")


@pytest.fixture(scope="module")
def checkpoint(cache_dir: Path) -> Path:
    return resolve_checkpoint(TransformersSpec(name="smol", path="builtin:smollm2-135m-instruct"), cache_dir)


@pytest.fixture(scope="module")
def adapter(checkpoint: Path, cache_dir: Path) -> Path:
    return build_adapter(checkpoint, ADAPTER, cache_dir / f"smollm2-lora-{ADAPTER.name}")


async def start(checkpoint: Path, cache_dir: Path, adapter: Path, **options: object) -> LocalEngine:
    spec = TransformersSpec(name="smol", path=str(checkpoint), dtype="bfloat16", max_num_seqs=4,
                            **options)  # type: ignore[arg-type]
    engine = LocalEngine(spec, cache_dir)
    await engine.start()
    await engine.load_adapter(ADAPTER.name, adapter)
    return engine


@pytest.fixture(scope="module")
async def cached(checkpoint: Path, cache_dir: Path, adapter: Path) -> AsyncIterator[LocalEngine]:
    engine = await start(checkpoint, cache_dir, adapter)
    yield engine
    await engine.close()


@pytest.fixture(scope="module")
async def uncached(checkpoint: Path, cache_dir: Path, adapter: Path) -> AsyncIterator[LocalEngine]:
    engine = await start(checkpoint, cache_dir, adapter, prefix_cache=False)
    yield engine
    await engine.close()


def request(i: int, question: str, adapter: str | None) -> GenerateRequest:
    messages = ({"role": "system", "content": CONTEXT}, {"role": "user", "content": question})
    return GenerateRequest(f"q{i}", SamplingParams(max_tokens=TOKENS, temperature=0.0), messages=messages,
                           adapter=adapter)


async def answer(generation: Generation) -> str:
    return "".join([delta.text async for delta in generation])


async def answers(engine: LocalEngine, questions: tuple[str, ...], adapter: str | None = None,
                  together: bool = False) -> list[str]:
    if together:
        generations = await engine.submit([request(i, q, adapter) for i, q in enumerate(questions)])
        return list(await asyncio.gather(*(answer(g) for g in generations)))
    return [await answer((await engine.submit([request(i, q, adapter)]))[0]) for i, q in enumerate(questions)]


async def test_questions_over_one_context_answer_the_same_and_hit(cached: LocalEngine,
                                                                  uncached: LocalEngine) -> None:
    hits = cached.stats().prefix_cache_hit_tokens
    got = await answers(cached, QUESTIONS + QUESTIONS[:1])  # the first question again at the end
    assert got == await answers(uncached, QUESTIONS + QUESTIONS[:1])
    assert got[0] == got[-1]
    assert cached.stats().prefix_cache_hit_tokens - hits >= len(QUESTIONS) * 4 * BLOCK  # the context: 5+ blocks


async def test_questions_at_once_answer_the_same(cached: LocalEngine, uncached: LocalEngine) -> None:
    assert await answers(cached, QUESTIONS, together=True) == await answers(uncached, QUESTIONS, together=True)


async def test_an_adapter_over_the_base_context_answers_as_without_the_cache(cached: LocalEngine,
                                                                              uncached: LocalEngine) -> None:
    await answers(cached, QUESTIONS[:1])  # the base's blocks of this context are held
    hits = cached.stats().prefix_cache_hit_tokens
    got = await answers(cached, QUESTIONS[:1], ADAPTER.name)
    assert cached.stats().prefix_cache_hit_tokens == hits
    assert got == await answers(uncached, QUESTIONS[:1], ADAPTER.name)


async def test_evictions_keep_the_answers(checkpoint: Path, cache_dir: Path, adapter: Path,
                                          uncached: LocalEngine) -> None:
    engine = await start(checkpoint, cache_dir, adapter, prefix_cache_gib=0.01)  # ~7 blocks of 64 tokens
    try:
        got = await answers(engine, QUESTIONS) + await answers(engine, QUESTIONS, ADAPTER.name)
        assert engine.stats().prefix_cache_evictions > 0
        assert got == await answers(uncached, QUESTIONS) + await answers(uncached, QUESTIONS, ADAPTER.name)
    finally:
        await engine.close()


async def test_chunks_with_the_cache_answer_the_same(checkpoint: Path, cache_dir: Path, adapter: Path,
                                                    uncached: LocalEngine) -> None:
    engine = await start(checkpoint, cache_dir, adapter, prefill_chunk_tokens=BLOCK)  # the context: 5+ chunks
    try:
        assert await answers(engine, QUESTIONS) == await answers(uncached, QUESTIONS)
    finally:
        await engine.close()


async def turn(engine: LocalEngine, messages: list[dict[str, str]]) -> tuple[str, int, int]:
    """One chat turn: its answer, its prompt's length and how much of the prompt the cache supplied."""
    [generation] = await engine.submit([GenerateRequest(
        "turn", SamplingParams(max_tokens=192, temperature=0.0), messages=tuple(messages))])
    deltas = [delta async for delta in generation]
    usage = deltas[-1].usage
    assert usage is not None and usage.cached_tokens is not None
    return "".join(d.text for d in deltas), usage.prompt_tokens, usage.cached_tokens


async def test_a_chats_next_turn_reuses_the_previous_answer(cached: LocalEngine, uncached: LocalEngine) -> None:
    """The answer's blocks are kept at its finish: the next turn, which resends it, prefills little more than the
    new question, and answers as without the cache."""
    messages = [{"role": "user", "content": "Tell me a long story about a robot who delivers parcels in a city."}]
    first, first_prompt, _ = await turn(cached, messages)
    assert len(first) > 400, "a short first answer: the test would prove little"
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "What happens next?"}]
    second, prompt, hit = await turn(cached, messages)
    assert hit > first_prompt // BLOCK * BLOCK + BLOCK, (first_prompt, prompt, hit)  # into the answer
    assert prompt - hit < 2 * BLOCK  # the new question and the unaligned tail
    assert second == (await turn(uncached, messages))[0]
