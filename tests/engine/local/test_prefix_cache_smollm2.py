"""The prefix cache on the real SmolLM2-135M-Instruct (bf16, the embedded default): the same greedy answers with
the cache as without it, for a knowledge-assistant context asked several questions, one after the other and all
at once, for an adapter over the same context, and under a budget that forces evictions.

"The same" is token for token, except after a near-tie.  On a CPU with AMX, oneDNN's bf16 matmuls give a row
bits that depend on how many rows the call has (it picks its algorithm by the shape: 9-32 rows or 783-1,486 rows
round a 1,536 × 576 projection otherwise than 2,000 do), so a prompt whose first blocks came from the cache, its
new tokens a shorter matmul, may round a logit otherwise.  Without AMX those matmuls give each row the same bits
whatever the call, and the answers are equal.  So two answers must agree token for token up to the first one that
differs, and there the answer without the cache must have had its two best tokens within ``TIE`` of each other,
the other answer taking the second: a wrong cached block makes an answer leave a clear choice, and fails."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from inhouse.config import TransformersSpec
from inhouse.engine.base import GenerateRequest, Generation, SamplingParams, TokenLogprob
from inhouse.engine.checkpoint import resolve_checkpoint
from inhouse.engine.local.engine import LocalEngine
from inhouse.engine.local.prefix_cache import BLOCK
from tests.tiny_lora import AdapterRecipe, build_adapter

pytestmark = pytest.mark.slow

TOKENS = 16
TIE = 0.5  # nats between the best two tokens: bf16 logits of SmolLM2's size are 0.125 apart at the least
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


Answer = list[TokenLogprob]  # a greedy answer's tokens, each with its two best candidates


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=True, top_logprobs=2)


def request(i: int, question: str, adapter: str | None) -> GenerateRequest:
    messages = ({"role": "system", "content": CONTEXT}, {"role": "user", "content": question})
    return GenerateRequest(f"q{i}", greedy(TOKENS), messages=messages, adapter=adapter)


async def answer(generation: Generation) -> Answer:
    return [logprob async for delta in generation for logprob in delta.logprobs or ()]


async def answers(engine: LocalEngine, questions: tuple[str, ...], adapter: str | None = None,
                  together: bool = False) -> list[Answer]:
    if together:
        generations = await engine.submit([request(i, q, adapter) for i, q in enumerate(questions)])
        return list(await asyncio.gather(*(answer(g) for g in generations)))
    return [await answer((await engine.submit([request(i, q, adapter)]))[0]) for i, q in enumerate(questions)]


def same(got: list[Answer], want: list[Answer]) -> bool:
    """Each answer of ``got`` is its ``want``'s, token for token until a near-tie of ``want``'s (module doc)."""
    assert len(got) == len(want)
    for mine, theirs in zip(got, want, strict=True):
        assert mine, "an empty answer: nothing to compare"
        for a, b in zip(mine, theirs, strict=False):
            if a.token == b.token:
                continue
            # it took the reference's other choice (at an exact tie the list may put either first)
            assert len(b.top) == 2 and a.token in {t for t, _ in b.top} and b.token in {t for t, _ in b.top}, (a, b)
            assert b.top[0][1] - b.top[1][1] < TIE, (a, b)  # ... which was nearly as good
            break
        else:
            assert len(mine) == len(theirs), "one answer stopped where the other went on"
    return True


async def test_questions_over_one_context_answer_the_same_and_hit(cached: LocalEngine,
                                                                  uncached: LocalEngine) -> None:
    hits = cached.stats().prefix_cache_hit_tokens
    got = await answers(cached, QUESTIONS + QUESTIONS[:1])  # the first question again at the end
    assert same(got, await answers(uncached, QUESTIONS + QUESTIONS[:1]))
    assert same(got[-1:], got[:1])
    assert cached.stats().prefix_cache_hit_tokens - hits >= len(QUESTIONS) * 4 * BLOCK  # the context: 5+ blocks


async def test_questions_at_once_answer_the_same(cached: LocalEngine, uncached: LocalEngine) -> None:
    assert same(await answers(cached, QUESTIONS, together=True), await answers(uncached, QUESTIONS, together=True))


async def test_an_adapter_over_the_base_context_answers_as_without_the_cache(cached: LocalEngine,
                                                                              uncached: LocalEngine) -> None:
    await answers(cached, QUESTIONS[:1])  # the base's blocks of this context are held
    hits = cached.stats().prefix_cache_hit_tokens
    got = await answers(cached, QUESTIONS[:1], ADAPTER.name)
    assert cached.stats().prefix_cache_hit_tokens == hits
    assert same(got, await answers(uncached, QUESTIONS[:1], ADAPTER.name))


async def test_evictions_keep_the_answers(checkpoint: Path, cache_dir: Path, adapter: Path,
                                          uncached: LocalEngine) -> None:
    engine = await start(checkpoint, cache_dir, adapter, prefix_cache_gib=0.01)  # ~7 blocks of 64 tokens
    try:
        got = await answers(engine, QUESTIONS) + await answers(engine, QUESTIONS, ADAPTER.name)
        assert engine.stats().prefix_cache_evictions > 0
        assert same(got, await answers(uncached, QUESTIONS) + await answers(uncached, QUESTIONS, ADAPTER.name))
    finally:
        await engine.close()


async def test_chunks_with_the_cache_answer_the_same(checkpoint: Path, cache_dir: Path, adapter: Path,
                                                    uncached: LocalEngine) -> None:
    engine = await start(checkpoint, cache_dir, adapter, prefill_chunk_tokens=BLOCK)  # the context: 5+ chunks
    try:
        assert same(await answers(engine, QUESTIONS), await answers(uncached, QUESTIONS))
    finally:
        await engine.close()


async def turn(engine: LocalEngine, messages: list[dict[str, str]]) -> tuple[Answer, int, int]:
    """One chat turn: its answer, its prompt's length and how much of the prompt the cache supplied."""
    [generation] = await engine.submit([GenerateRequest("turn", greedy(192), messages=tuple(messages))])
    deltas = [delta async for delta in generation]
    usage = deltas[-1].usage
    assert usage is not None and usage.cached_tokens is not None
    return [lp for d in deltas for lp in d.logprobs or ()], usage.prompt_tokens, usage.cached_tokens


async def test_a_chats_next_turn_reuses_the_previous_answer(cached: LocalEngine, uncached: LocalEngine) -> None:
    """The answer's blocks are kept at its finish: the next turn, which resends it, prefills little more than the
    new question, and answers as without the cache."""
    messages = [{"role": "user", "content": "Tell me a long story about a robot who delivers parcels in a city."}]
    first, first_prompt, _ = await turn(cached, messages)
    text = "".join(t.token for t in first)
    assert len(text) > 400, "a short first answer: the test would prove little"
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "What happens next?"}]
    second, prompt, hit = await turn(cached, messages)
    assert hit > first_prompt // BLOCK * BLOCK + BLOCK, (first_prompt, prompt, hit)  # into the answer
    assert prompt - hit < 2 * BLOCK  # the new question and the unaligned tail
    assert same([second], [(await turn(uncached, messages))[0]])
