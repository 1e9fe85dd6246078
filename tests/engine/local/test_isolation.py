"""One poisoned row fails alone: the transformers engine, in-process on the real tiny model.

The server refuses these values at the edge (tests/e2e/test_hardening.py); here they are handed to the
engine directly, as a value the edge missed would be, next to innocent requests batched in the same steps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from inhouse.config import TransformersSpec
from inhouse.engine.base import GenerateRequest, Generation, SamplingParams
from inhouse.engine.collector import OutputCollector
from inhouse.engine.local.detokenizer import IncrementalDetokenizer, StopMatcher
from inhouse.engine.local.engine import LocalEngine
from inhouse.engine.local.sequence import Sequence
from inhouse.errors import ErrorCode, InhouseError

HI = ({"role": "user", "content": "hello"},)
TOKENS = 24


@pytest.fixture(scope="module")
async def engine(tiny_model_dir: Path, cache_dir: Path) -> AsyncIterator[LocalEngine]:
    spec = TransformersSpec(name="tiny", path=str(tiny_model_dir), dtype="float32",
                     max_num_seqs=8, max_waiting=4)
    engine = LocalEngine(spec, cache_dir)
    await engine.start()
    yield engine
    await engine.close()


def innocent(i: int) -> GenerateRequest:
    return GenerateRequest(f"innocent-{i}", SamplingParams(max_tokens=TOKENS, ignore_eos=True, temperature=0.8,
                                                           seed=i), messages=HI)


async def idle(engine: LocalEngine) -> bool:
    """Every admitted request released (the engine thread releases right after the last delta)."""
    for _ in range(500):
        if engine._gate.in_progress == 0:
            return True
        await asyncio.sleep(0.01)
    return False


async def outcome(generation: Generation) -> tuple[int, str | None] | InhouseError:
    tokens, finish = 0, None
    try:
        async for delta in generation:
            tokens += delta.token_count
            finish = delta.finish_reason or finish
    except InhouseError as exc:
        return exc
    return tokens, finish


@pytest.mark.parametrize("poison", [
    # ignore_eos: a clamped row must run its full length, whatever the random tiny model's EOS odds
    SamplingParams(max_tokens=TOKENS, ignore_eos=True, temperature=1.0, top_k=2**63),  # long long overflow
    SamplingParams(max_tokens=TOKENS, ignore_eos=True, repetition_penalty=1e-300),  # inf / nan scores
    SamplingParams(max_tokens=TOKENS, ignore_eos=True, temperature=1.0, repetition_penalty=1e-300),
    SamplingParams(max_tokens=TOKENS, ignore_eos=True, logprobs=True, top_logprobs=10**6),  # > vocabulary
], ids=["top_k_overflow", "penalty_greedy", "penalty_sampled", "top_logprobs"])
async def test_a_poisoned_sampling_row_fails_alone(engine: LocalEngine, poison: SamplingParams) -> None:
    good = await engine.submit([innocent(i) for i in range(3)])
    bad = await engine.submit([GenerateRequest("poison", poison, messages=HI)])
    results = await asyncio.gather(*(outcome(g) for g in good + bad))
    assert results[:3] == [(TOKENS, "length")] * 3, results
    last = results[3]
    # clamped to the vocabulary, or failed on its own with engine_error: never the others' problem
    assert last == (TOKENS, "length") or (isinstance(last, InhouseError) and last.code is ErrorCode.ENGINE_ERROR)
    assert await idle(engine)


async def test_a_prompt_that_breaks_the_batched_prefill_fails_alone(engine: LocalEngine) -> None:
    """A token id the edge missed (out of the vocabulary) is refused by submit; pushed past it, the batched
    prefill fails, is retried prompt by prompt, and only that prompt's request fails."""
    with pytest.raises(InhouseError) as refused:
        await engine.submit([GenerateRequest("bad-ids", SamplingParams(max_tokens=4), prompt=(999_999,))])
    assert refused.value.code is ErrorCode.INVALID_REQUEST and refused.value.param == "prompt"
    assert engine._loaded is not None and engine._prompts is not None
    good = [innocent(i) for i in range(3)]
    prompts = await engine._prompts.token_ids_all(good)
    collector = OutputCollector(asyncio.get_running_loop())  # type: ignore[var-annotated]
    poisoned = Sequence("poisoned", [1, 999_999, 2], SamplingParams(max_tokens=TOKENS), TOKENS, collector,
                        IncrementalDetokenizer(engine._loaded.tokenizer, [1]), StopMatcher(()))
    generations = []
    loop = asyncio.get_running_loop()
    with engine._lock:  # one inbox hand-off, so all four are prefilled in one batch
        for request, ids in zip(good, prompts, strict=True):
            seq = Sequence(request.request_id, ids, request.sampling, TOKENS, OutputCollector(loop),
                           IncrementalDetokenizer(engine._loaded.tokenizer, ids), StopMatcher(()))
            engine._gate.admit()
            engine._inbox.append(seq)
            generations.append(Generation(seq.request_id, len(ids), seq.collector, engine._abort))
        engine._gate.admit()
        engine._inbox.append(poisoned)
        engine._wakeup.notify()
    generations.append(Generation("poisoned", 3, collector, engine._abort))
    results = await asyncio.gather(*(outcome(g) for g in generations))
    assert results[:3] == [(TOKENS, "length")] * 3, results
    assert isinstance(results[3], InhouseError) and results[3].code is ErrorCode.ENGINE_ERROR
    assert await idle(engine)


async def test_a_call_with_more_choices_than_the_engine_holds_is_a_400_and_takes_no_slot(engine: LocalEngine) -> None:
    with pytest.raises(InhouseError) as refused:
        await engine.submit([innocent(i) for i in range(13)])  # 8 running + 4 waiting
    assert refused.value.code is ErrorCode.INVALID_REQUEST and "12" in refused.value.message
    assert engine._gate.in_progress == 0


async def test_a_full_engine_refuses_before_tokenizing(engine: LocalEngine) -> None:
    """Issue 8: queue-full refusals tokenized the prompt first (117 ms p50 for a long one)."""
    assert engine._prompts is not None
    held = await engine.submit([GenerateRequest(f"full-{i}", SamplingParams(max_tokens=400, ignore_eos=True),
                                                messages=HI) for i in range(12)])
    tokenized = 0
    builder = engine._prompts
    token_ids_all = builder.token_ids_all

    async def counting(requests: list[GenerateRequest]) -> list[list[int]]:
        nonlocal tokenized
        tokenized += 1
        return await token_ids_all(requests)

    builder.token_ids_all = counting  # type: ignore[method-assign]
    try:
        with pytest.raises(InhouseError) as refused:
            await engine.submit([GenerateRequest("late", SamplingParams(max_tokens=4), prompt="word " * 5000)])
    finally:
        del builder.token_ids_all
        for generation in held:
            generation.abort()
    assert refused.value.code is ErrorCode.QUEUE_FULL and tokenized == 0
    assert await idle(engine)


async def test_choices_are_admitted_all_or_nothing(engine: LocalEngine) -> None:
    held = await engine.submit([GenerateRequest(f"hold-{i}", SamplingParams(max_tokens=400, ignore_eos=True),
                                                messages=HI) for i in range(10)])
    with pytest.raises(InhouseError) as refused:
        await engine.submit([innocent(i) for i in range(3)])  # 2 slots left: none taken
    assert refused.value.code is ErrorCode.QUEUE_FULL
    assert engine._gate.in_progress == 10
    two = await engine.submit([innocent(i) for i in range(2)])
    assert engine._gate.in_progress == 12
    for generation in held:
        generation.abort()
    assert [await outcome(g) for g in two] == [(TOKENS, "length")] * 2
