"""Chunked prefill: a long prompt's chunks alternate with the running sequences' decode steps (the scheduler's
steps, checked one by one), and the engine's greedy tokens are the same with chunks as without (tiny model,
float32), with the prefix cache too."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from inhouse.config import TransformersSpec
from inhouse.engine.base import GenerateRequest, Generation, SamplingParams
from inhouse.engine.local.engine import LocalEngine
from inhouse.engine.local.pace import Pace
from inhouse.engine.local.scheduler import ALIGN, Scheduler, Step, _aligned
from inhouse.engine.local.sequence import Sequence
from tests.engine.local.test_pace import DECODE, excess, feed
from tests.engine.local.test_scheduler import assert_slots_compact, seq, tiers

CHUNK = 64


def chunked(slots: int = 4) -> Scheduler:
    return Scheduler(tiers(), max_num_seqs=slots, max_prefill_tokens=4096, budget_tokens=10**6, chunk_tokens=16)


def run(s: Scheduler) -> Step:
    """One step, as the engine runs it: a prefill's sequences then hold what it prefilled."""
    step = s.schedule()
    assert step is not None
    s.prefilled(step, step.prefill)
    return step


def test_a_long_prompt_is_chunked_beside_the_decode_rows_of_the_others() -> None:
    s = chunked()
    a, b = seq("a", 4), seq("b", 40)
    s.add(a)
    assert run(s).prefill == [a]
    s.add(b)
    steps = [run(s) for _ in range(3)]
    assert [(st.decode, st.prefill, st.chunk) for st in steps] == [([a], [b], 16), ([a], [b], 16), ([a], [b], 8)]
    assert b.cached == 40 and s.chunking is None and s.tiers.pinned is None
    last = run(s)
    assert last.decode == [a, b] and last.prefill == []  # b decodes with the others now
    assert_slots_compact(s)


def test_with_nothing_decoding_a_long_prompt_is_prefilled_whole() -> None:
    s = chunked()
    long_ = seq("long", 300)
    s.add(long_)
    step = run(s)
    assert (step.decode, step.prefill, step.chunk, step.prompt_tokens) == ([], [long_], 0, 300)
    assert s.chunking is None


def paced(streams: int, chunk_tokens: int = 256, wait: float = 0.0) -> tuple[Scheduler, Pace, list[Sequence]]:
    """A scheduler whose ``streams`` short sequences decode, its pace fed by ``feed``; one or two streams wait
    ``wait`` seconds for a chunk (0: less than any chunk takes, so a chunk is ``chunk_tokens``)."""
    s = Scheduler(tiers(), max_num_seqs=8, max_prefill_tokens=4096, budget_tokens=10**6, chunk_tokens=chunk_tokens)
    running = [seq(f"a{i}", 4) for i in range(streams)]
    for a in running:
        s.add(a)
    run(s)
    assert s.pace is not None
    s.pace.wait = wait
    feed(s.pace, decode_rows=streams)
    return s, s.pace, running


def test_the_pace_sets_the_chunk_while_others_decode() -> None:
    s, pace, streams = paced(6)
    b = seq("b", 400)
    s.add(b)
    first = run(s)
    assert first.decode == streams and first.prefill == [b] and first.chunk == _aligned(0, pace.budget(6), 400)
    assert first.chunk % ALIGN == 0  # cut to a multiple of 16 (shorter than a query block)
    assert excess(first.chunk, 0) <= 1.5 * DECODE * 1.02 < excess(first.chunk + ALIGN, 0) * 1.02  # 1.5 decode steps
    second = run(s)  # further into the prompt, a chunk reads more keys: a smaller one fits
    assert pace.budget(6, offset=first.chunk) < pace.budget(6, offset=0)
    assert second.chunk == _aligned(first.chunk, pace.budget(6, offset=first.chunk), 400) <= first.chunk
    assert second.pairs == second.chunk * (first.chunk + second.chunk / 2)
    for _ in range(30):  # much faster decode steps (a running average follows them): never below 16 tokens
        pace.ran(0.001, decode_rows=6, prompt_tokens=0)
    assert run(s).chunk == 16


@pytest.mark.parametrize("streams", [1, 2])
def test_one_or_two_streams_wait_for_a_whole_chunk(streams: int) -> None:
    """A RAG app's few users: the prompt goes in chunks of the configured size, not of the pace's shared stall."""
    s, pace, running = paced(streams, chunk_tokens=512)
    b = seq("b", 2000)
    s.add(b)
    step = run(s)
    assert step.decode == running and step.chunk == 512 > 3 * pace.budget(3)
    assert run(s).chunk == 512 and b.cached == 1024


def test_one_stream_on_a_fast_machine_waits_as_long_for_a_bigger_chunk() -> None:
    """Where the pace says more than ``chunk_tokens`` fit the few streams' wait, the chunk is what fits."""
    s, pace, running = paced(1, chunk_tokens=256, wait=0.4)
    b = seq("b", 2000)
    s.add(b)
    step = run(s)
    assert step.decode == running and 256 < step.chunk <= pace.budget(1) <= 2 * 256


def test_short_prompts_beside_a_chunk_take_their_share_of_its_budget() -> None:
    s, pace, _ = paced(4)
    long_, short = seq("long", 1000), seq("short", 20)
    s.add(long_)
    run(s)
    s.add(short)
    offset = long_.cached
    step = run(s)
    assert step.prefill == [short, long_] and step.prompt_tokens == 20 + step.chunk
    assert step.chunk == _aligned(offset, pace.budget(4, offset, tokens=20, pairs=20 * 10), 1000)
    assert pace.budget(4, offset, tokens=20, pairs=20 * 10) < pace.budget(4, offset)


def test_a_chunk_waits_a_step_that_short_prompts_fill() -> None:
    s, pace, _ = paced(6)
    long_, short = seq("long", 1000), seq("short", 60)
    s.add(long_)
    run(s)
    offset = long_.cached
    s.add(short)
    step = run(s)  # 60 tokens add 34 ms, more than six streams' stall (30 ms): no room for 16 more
    assert step.prefill == [short] and step.chunk == 0 and long_.cached == offset and s.chunking is long_
    step = run(s)  # the short one decodes now too: seven streams
    assert pace.budget(7, offset) == pace.budget(6, offset)  # 1.5 decode steps each
    assert step.prefill == [long_] and step.chunk == _aligned(offset, pace.budget(7, offset), 1000)
    assert long_.cached > offset


def test_when_the_streams_all_finish_a_chunked_prompt_goes_on_by_its_chunk_size_not_its_whole_rest() -> None:
    """Taking the rest whole (seconds of prefill) made the streams' next chats wait for all of it: in the mixed
    workload their TTFT p50 went to 1.4 s in a run where the six streams finished together."""
    s, _, streams = paced(2, chunk_tokens=64)
    long_ = seq("long", 480)
    s.add(long_)
    first = run(s)
    assert first.decode == streams and first.prefill == [long_] and 0 < first.chunk <= 64
    for a in streams:
        s.finish(a, answered=True)
    alone = run(s)
    assert (alone.decode, alone.prefill, alone.chunk) == ([], [long_], 64)
    late = seq("late", 20)
    s.add(late)
    offset = long_.cached
    beside = run(s)
    assert (beside.decode, beside.prefill, beside.chunk) == ([], [late, long_], _aligned(offset, 64 - 20, 480))
    assert long_.cached == first.chunk + 64 + beside.chunk and s.chunking is long_


def test_short_prompts_go_in_whole_beyond_the_pace_and_a_long_one_in_its_chunks() -> None:
    s = Scheduler(tiers(), max_num_seqs=8, max_prefill_tokens=4096, budget_tokens=10**6, chunk_tokens=256)
    for i in range(3):  # three streams (one or two would wait for a whole chunk)
        s.add(seq(f"first{i}", 3))
    run(s)
    assert s.pace is not None and s.pace.budget(3) == 16  # no decode step timed yet: the least
    shorts, long_ = [seq(f"s{i}", 30) for i in range(3)], seq("long", 200)
    for q in (*shorts, long_):
        s.add(q)
    step = run(s)
    assert step.prefill == shorts[:2] and step.chunk == 0  # 30 + 30 tokens: whole, within the 64 of short prompts
    step = run(s)
    assert step.prefill == shorts[2:]  # 30 + 200 > 64: the long one waits for the next step
    step = run(s)
    assert step.prefill == [long_] and step.chunk == 16  # and goes in chunks the pace's size


def test_short_prompts_batch_within_the_budget_and_go_beside_a_chunked_one() -> None:
    s = chunked(slots=8)
    first, shorts = seq("first", 3), [seq(f"s{i}", 6) for i in range(3)]
    long_, later, second = seq("long", 20), seq("later", 3), seq("second", 17)
    s.add(first)
    run(s)  # something decodes from now on: steps take 16 prompt tokens beside it
    for q in (*shorts, long_, later, second):
        s.add(q)
    assert run(s).prefill == shorts[:2]  # 12 tokens; a third would make 18 > 16
    assert run(s).prefill == shorts[2:]  # then 6 + 20 > 16: the long one waits for the next step
    step = run(s)
    assert step.prefill == [long_] and step.chunk == 16 and list(s.waiting) == [later, second]
    step = run(s)  # a short prompt goes in whole beside the chunk; one longer than SHORT's share waits for it
    assert step.prefill == [later, long_] and step.chunk == 4 and step.prompt_tokens == 7
    assert later.cached == 3 and long_.cached == 20 and list(s.waiting) == [second]
    assert run(s).prefill == [second]  # the long one is prefilled: the next prompt goes in


def test_finishing_during_chunks_keeps_the_chunked_prompt_last() -> None:
    s = chunked()
    a, b, c = seq("a", 4), seq("b", 5), seq("c", 40)
    s.add(a)
    s.add(b)
    run(s)
    s.add(c)
    run(s)  # c's first chunk, in slot 2
    assert c.slot == 2 and s.tiers.pinned is c
    cache = s.tiers.cache(c)
    with torch.inference_mode():
        for layer in range(cache.num_layers):
            cache.keys[layer][2, :, :16].fill_(7.0)
    s.finish(a)  # b moves into slot 0, c into slot 1 with its 16 tokens
    assert s.running == [b, c] and b.slot == 0 and c.slot == 1
    assert (cache.keys[0][1, :, :16] == 7.0).all()
    step = run(s)
    assert step.decode == [b] and step.prefill == [c]
    s.finish(c)  # aborted mid-prefill
    assert s.running == [b] and s.chunking is None and s.tiers.pinned is None and c.slot == -1
    assert_slots_compact(s)


def test_slots_stay_compact_with_chunks_through_random_arrivals_and_departures() -> None:
    rng = random.Random(11)
    s = chunked(slots=4)
    for i in range(300):
        if rng.random() < 0.4:
            s.add(seq(f"r{i}", rng.randint(1, 50)))
        elif rng.random() < 0.3 and s.running:
            s.finish(rng.choice(s.running))
        elif s.has_work():
            step = run(s)
            assert all(q in s.running for q in step.seqs)
            assert s.chunking not in step.decode
        assert_slots_compact(s)
        chunking = s.chunking
        assert chunking is s.tiers.pinned
        assert chunking is None or s.tiers.members[chunking.tier][-1] is chunking


# ---- the engine ------------------------------------------------------------------------------


def ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 520) for _ in range(n)]


async def start(tiny_model_dir: Path, cache_dir: Path, **options: object) -> LocalEngine:
    spec = TransformersSpec(name="tiny", path=str(tiny_model_dir), dtype="float32", max_num_seqs=4,
                            **options)  # type: ignore[arg-type]
    engine = LocalEngine(spec, cache_dir)
    await engine.start()
    return engine


@pytest.fixture(scope="module")
async def whole(tiny_model_dir: Path, cache_dir: Path) -> AsyncIterator[LocalEngine]:
    engine = await start(tiny_model_dir, cache_dir, prefill_chunk_tokens=0, prefix_cache=False)
    yield engine
    await engine.close()


@pytest.fixture(scope="module")
async def chunks(tiny_model_dir: Path, cache_dir: Path) -> AsyncIterator[LocalEngine]:
    engine = await start(tiny_model_dir, cache_dir, prefill_chunk_tokens=CHUNK)
    yield engine
    await engine.close()


def request(name: str, prompt: list[int], tokens: int) -> GenerateRequest:
    sampling = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    return GenerateRequest(name, sampling, prompt=tuple(prompt))


async def answer(generation: Generation) -> str:
    return "".join([delta.text async for delta in generation])


async def interleaved(engine: LocalEngine, short: list[int], long_: list[int]) -> tuple[str, str, int]:
    """A stream decoding, then a long prompt arriving: both answers, and how many of the stream's tokens came
    between the long prompt's arrival and its first token."""
    [generation] = await engine.submit([request("stream", short, 120)])
    stream = aiter(generation)
    delta = await anext(stream)  # it decodes
    seen, text = delta.token_count, delta.text
    [late] = await engine.submit([request("late", long_, 8)])
    at_arrival, first = seen, None
    late_text = ""

    async def read_late() -> None:
        nonlocal first, late_text
        async for delta in late:
            first = seen if first is None else first
            late_text += delta.text

    reader = asyncio.create_task(read_late())
    async for delta in stream:
        seen, text = seen + delta.token_count, text + delta.text
    await reader
    assert first is not None
    return text, late_text, first - at_arrival


async def test_a_long_prompt_lets_a_running_stream_decode_between_its_chunks(
        whole: LocalEngine, chunks: LocalEngine) -> None:
    short, long_ = ids(10, seed=1), ids(7 * CHUNK, seed=2)
    text, late_text, between = await interleaved(chunks, short, long_)
    assert (text, late_text) == (await interleaved(whole, short, long_))[:2]  # the same greedy tokens
    assert between >= 3, f"only {between} tokens of the stream between the long prompt's 7 chunks"


async def test_chunks_and_the_prefix_cache_together_answer_the_same(whole: LocalEngine,
                                                                      chunks: LocalEngine) -> None:
    prompt = ids(5 * CHUNK + 11, seed=3)
    hits = chunks.stats().prefix_cache_hit_tokens
    first = await answer((await chunks.submit([request("a", prompt, 12)]))[0])
    again = await answer((await chunks.submit([request("b", [*prompt, 7, 8, 9], 12)]))[0])
    assert chunks.stats().prefix_cache_hit_tokens - hits == 5 * CHUNK  # the whole blocks of the first prompt
    assert first == await answer((await whole.submit([request("c", prompt, 12)]))[0])
    assert again == await answer((await whole.submit([request("d", [*prompt, 7, 8, 9], 12)]))[0])


async def test_a_short_prompt_is_answered_while_a_long_one_is_still_in_its_chunks(
        whole: LocalEngine, chunks: LocalEngine) -> None:
    """A chat that arrives while someone's long prompt is being chunked goes in whole beside the next chunk; it
    does not wait for the whole long prompt (a Dify user's next question behind another user's documents)."""
    short, long_, quick = ids(10, seed=4), ids(7 * CHUNK, seed=5), ids(12, seed=6)
    [generation] = await chunks.submit([request("stream", short, 40)])
    stream = aiter(generation)
    await anext(stream)  # it decodes, so the long prompt goes in chunks
    firsts: list[str] = []

    async def read(name: str, generation: Generation) -> str:
        text = ""
        async for delta in generation:
            if not text and delta.text:
                firsts.append(name)
            text += delta.text
        return text

    [late] = await chunks.submit([request("late", long_, 8)])
    [soon] = await chunks.submit([request("quick", quick, 8)])
    texts = await asyncio.gather(read("late", late), read("quick", soon), answer(generation))
    assert firsts == ["quick", "late"]
    assert texts[0] == await answer((await whole.submit([request("late2", long_, 8)]))[0])
    assert texts[1] == await answer((await whole.submit([request("quick2", quick, 8)]))[0])


@pytest.mark.parametrize(("cached", "chunk", "want"), [
    (0, 100, 96),  # shorter than two query blocks: to a multiple of 16
    (0, 130, 128),  # two blocks or more: cut to end on a block's edge
    (70, 200, 186),  # 256, the block's edge
    (3000, 16, 8),  # shorter: to a multiple of 16, so the next chunk starts on one
    (3008, 16, 16),  # already ends on one
    (3000, 5, 5),  # the cut would leave nothing: as it is
    (990, 10, 10),  # the prompt's last tokens: as they are
    (800, 90, 90),  # 200 left, no more than four such chunks: a cut could add a step, so none
    (800, 40, 32),  # 200 left is five 40-token chunks: cut
])
def test_a_chunk_ends_on_a_query_block_or_a_multiple_of_16(cached: int, chunk: int, want: int) -> None:
    """Attention reads the keys up to a block's end once for all its new queries: a chunk ending inside a block
    made the next read them again (a 16-token chunk at offset 3,000: 17.6 ms over 30 layers, at 3,008: 13.1)."""
    assert _aligned(cached, chunk, 1000 if cached < 1000 else 4000) == want


def test_beside_decoding_streams_chunks_end_on_multiples_of_16_until_the_last_few() -> None:
    s, _, streams = paced(6)
    long_ = seq("long", 1000)
    s.add(long_)
    chunks = []
    while s.chunking is long_ or long_.cached == 0:
        left = 1000 - long_.cached
        step = run(s)
        assert step.decode == streams and step.prefill == [long_]
        chunks.append((left, step.chunk, long_.cached))
    assert len(chunks) > 5 and chunks[-1][2] == 1000
    assert all(end % ALIGN == 0 for left, chunk, end in chunks if left > 4 * chunk)
    assert sum(left > 4 * chunk for left, chunk, _ in chunks) > len(chunks) // 2
