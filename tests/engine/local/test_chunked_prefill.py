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
from inhouse.engine.local.scheduler import ALIGN, SHORT, Scheduler, Step, _aligned
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
    assert [(st.decode, st.prefill, st.chunks) for st in steps] == [([a], [b], [16]), ([a], [b], [16]),
                                                                    ([a], [b], [8])]
    assert b.cached == 40 and s.chunking == [] and s.tiers.pinned == []
    last = run(s)
    assert last.decode == [a, b] and last.prefill == []  # b decodes with the others now
    assert_slots_compact(s)


def test_with_nothing_decoding_a_long_prompt_is_prefilled_whole() -> None:
    s = chunked()
    long_ = seq("long", 300)
    s.add(long_)
    step = run(s)
    assert (step.decode, step.prefill, step.chunks, step.prompt_tokens) == ([], [long_], [300], 300)
    assert s.chunking == []


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
    [chunk] = first.chunks
    assert first.decode == streams and first.prefill == [b] and chunk == _aligned(0, pace.budget(6), 400)
    assert chunk % ALIGN == 0  # cut to a multiple of 16 (shorter than a query block)
    assert excess(chunk, 0) <= DECODE * 1.02 < excess(chunk + ALIGN, 0) * 1.02  # a decode step's time (six streams)
    second = run(s)  # further into the prompt, a chunk reads more keys: a smaller one fits
    assert pace.budget(6, offset=chunk) < pace.budget(6, offset=0)
    assert second.chunks == [_aligned(chunk, pace.budget(6, offset=chunk), 400)] and second.chunks[0] <= chunk
    assert second.pairs == second.chunks[0] * (chunk + second.chunks[0] / 2)
    for _ in range(30):  # much faster decode steps (a running average follows them): never below 16 tokens
        pace.ran(0.001, decode_rows=6, prompt_tokens=0)
    assert run(s).chunks == [16]


@pytest.mark.parametrize("streams", [1, 2])
def test_one_or_two_streams_wait_for_a_whole_chunk(streams: int) -> None:
    """A RAG app's few users: the prompt goes in chunks of the configured size, not of the pace's shared stall."""
    s, pace, running = paced(streams, chunk_tokens=512)
    b = seq("b", 2000)
    s.add(b)
    step = run(s)
    assert step.decode == running and step.chunks == [512] and 3 * pace.budget(3) < 512
    assert run(s).chunks == [512] and b.cached == 1024


def test_one_stream_on_a_fast_machine_waits_as_long_for_a_bigger_chunk() -> None:
    """Where the pace says more than ``chunk_tokens`` fit the few streams' wait, the chunk is what fits."""
    s, pace, running = paced(1, chunk_tokens=256, wait=0.4)
    b = seq("b", 2000)
    s.add(b)
    step = run(s)
    assert step.decode == running and 256 < step.chunks[0] <= pace.budget(1) <= 2 * 256


def test_short_prompts_beside_a_chunk_take_their_share_of_its_budget() -> None:
    s, pace, _ = paced(4)
    long_, short = seq("long", 1000), seq("short", 20)
    s.add(long_)
    run(s)
    s.add(short)
    offset = long_.cached
    step = run(s)
    assert step.prefill == [short, long_] and step.chunks[0] == 20  # the short one first, whole
    assert step.chunks[1] == _aligned(offset, pace.budget(4, offset, tokens=20, pairs=20 * 10), 1000)
    assert pace.budget(4, offset, tokens=20, pairs=20 * 10) < pace.budget(4, offset)


def test_a_short_prompt_over_the_pace_is_chunked_too_and_goes_ahead_of_a_long_ones_chunks() -> None:
    """A chat taken whole beside six streams made its step 3x a decode step (73 ms against 22 on a CPU without
    AMX), and those steps, one per arrival, set the streams' inter-token p99."""
    s, pace, streams = paced(6)
    long_, short = seq("long", 1000), seq("short", 60)
    s.add(long_)
    run(s)
    s.add(short)
    offset, first = long_.cached, pace.budget(6)
    assert first < 60  # 60 tokens add 34 ms, more than six streams' stall (20 ms)
    step = run(s)
    beside = pace.budget(6, offset, tokens=first, pairs=first * first / 2)
    assert step.prefill == [short, long_][: 1 + bool(beside)] and step.chunks[0] == first
    assert s.chunking == [long_, short] and s.tiers.pinned == [long_, short]  # each pinned in its own tier
    offset = long_.cached
    step = run(s)  # the short one's rest first, then what is left for the long one
    rest = 60 - first
    beside = pace.budget(6, offset, tokens=rest, pairs=rest * (first + rest / 2))
    assert step.prefill == [short, long_][: 1 + bool(beside)]
    assert step.chunks == [rest, _aligned(offset, beside, 1000)][: 1 + bool(beside)]
    assert short.cached == 60 and s.chunking == [long_] and s.tiers.pinned == [long_]
    step = run(s)
    assert step.decode == [*streams, short] and step.prefill == [long_]  # it decodes: seven streams


def test_a_short_prompt_with_others_waiting_behind_it_goes_in_whole() -> None:
    """A queue of chats (a burst): each step takes the first whole, as cutting it would only make those behind it
    wait longer; the last, alone, is cut to the pace."""
    s, pace, _ = paced(6)
    shorts = [seq(f"s{i}", 60) for i in range(2)]
    for q in shorts:
        s.add(q)
    assert pace.budget(6, waiting=2) < 60
    assert run(s).prefill == shorts[:1]  # whole: one waits behind it (and no room is left beside it)
    step = run(s)
    assert step.prefill == shorts[1:] and step.chunks == [pace.budget(7, waiting=1)] and shorts[1].cached < 60


def test_when_the_streams_all_finish_a_chunked_prompt_goes_on_by_its_chunk_size_not_its_whole_rest() -> None:
    """Taking the rest whole (seconds of prefill) made the streams' next chats wait for all of it: in the mixed
    workload their TTFT p50 went to 1.4 s in a run where the six streams finished together."""
    s, _, streams = paced(2, chunk_tokens=64)
    long_ = seq("long", 480)
    s.add(long_)
    first = run(s)
    assert first.decode == streams and first.prefill == [long_] and 0 < first.chunks[0] <= 64
    for a in streams:
        s.finish(a, answered=True)
    alone = run(s)
    assert (alone.decode, alone.prefill, alone.chunks) == ([], [long_], [64])
    late = seq("late", 20)
    s.add(late)
    offset = long_.cached
    beside = run(s)
    assert (beside.decode, beside.prefill, beside.chunks) == ([], [late, long_], [20, _aligned(offset, 64 - 20, 480)])
    assert long_.cached == first.chunks[0] + 64 + beside.chunks[1] and s.chunking == [long_]


def test_queued_short_prompts_go_in_whole_one_a_step_and_a_long_one_after_them_in_chunks() -> None:
    s = Scheduler(tiers(), max_num_seqs=8, max_prefill_tokens=4096, budget_tokens=10**6, chunk_tokens=256)
    for i in range(3):  # three streams (one or two would wait for a whole chunk)
        s.add(seq(f"first{i}", 3))
    run(s)
    assert s.pace is not None and s.pace.budget(3) == 16  # no decode step timed yet: the least
    shorts, long_ = [seq(f"s{i}", 30) for i in range(3)], seq("long", 200)
    for q in (*shorts, long_):
        s.add(q)
    steps = [run(s) for _ in range(5)]
    assert [(st.prefill, st.chunks) for st in steps] == [
        ([shorts[0]], [30]), ([shorts[1]], [30]), ([shorts[2]], [30]),  # each with another waiting behind it
        ([long_], [16]), ([long_], [16]),  # the long one in chunks the pace's size
    ]


def test_short_prompts_batch_within_the_budget_and_the_last_one_alone_is_cut() -> None:
    s = chunked(slots=8)
    first, shorts = seq("first", 3), [seq(f"s{i}", 6) for i in range(3)]
    longer, later, last = seq("longer", 20), seq("later", 3), seq("last", 17)
    s.add(first)
    run(s)  # something decodes from now on: steps take 16 prompt tokens beside it
    for q in (*shorts, longer, later, last):
        s.add(q)
    assert run(s).prefill == shorts[:2]  # 12 tokens; a third would make 18 > 16, and 4 are too few to cut it
    assert run(s).prefill == shorts[2:]  # then 6 + 20 > 16: the next waits for the next step
    step = run(s)  # 20 > 16, but with others waiting behind it, whole: cutting it would keep them waiting longer
    assert step.prefill == [longer] and step.chunks == [20] and list(s.waiting) == [later, last]
    step = run(s)
    assert step.prefill == [later] and list(s.waiting) == [last]  # 13 tokens left: too few to start the last
    step = run(s)  # alone: cut to the budget
    assert step.prefill == [last] and step.chunks == [16] and s.chunking == [last]
    assert run(s).chunks == [1] and s.chunking == []


def test_finishing_during_chunks_keeps_the_chunked_prompt_last() -> None:
    s = chunked()
    a, b, c = seq("a", 4), seq("b", 5), seq("c", 40)
    s.add(a)
    s.add(b)
    run(s)
    s.add(c)
    run(s)  # c's first chunk, in slot 2
    assert c.slot == 2 and s.tiers.pinned == [c]
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
    assert s.running == [b] and s.chunking == [] and s.tiers.pinned == [] and c.slot == -1
    assert_slots_compact(s)


def test_slots_stay_compact_with_chunks_through_random_arrivals_and_departures() -> None:
    rng = random.Random(11)
    s = chunked(slots=6)
    for i in range(400):
        if rng.random() < 0.4:  # chats, and now and then a long prompt (its own tier: two pinned at once)
            s.add(seq(f"r{i}", rng.randint(1, 50) if rng.random() < 0.8 else rng.randint(250, 400)))
        elif rng.random() < 0.3 and s.running:
            s.finish(rng.choice(s.running))
        elif s.has_work():
            step = run(s)
            assert all(q in s.running for q in step.seqs)
            assert not set(s.chunking) & set(step.decode)
        assert_slots_compact(s)
        assert s.chunking == s.tiers.pinned
        for c in s.chunking:  # the last slots of their tier
            members = s.tiers.members[c.tier]
            assert c in members[len(members) - sum(x.tier == c.tier for x in s.chunking) :]
        assert sum(len(c.prompt_ids) - c.cached > SHORT for c in s.chunking) <= 1  # one long one at a time


# ---- the engine ------------------------------------------------------------------------------


def ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 520) for _ in range(n)]


async def start(tiny_model_dir: Path, cache_dir: Path, **options: object) -> LocalEngine:
    options = {"max_num_seqs": 4, **options}
    spec = TransformersSpec(name="tiny", path=str(tiny_model_dir), dtype="float32", **options)  # type: ignore[arg-type]
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


@pytest.fixture(scope="module")
async def small_chunks(tiny_model_dir: Path, cache_dir: Path) -> AsyncIterator[LocalEngine]:
    engine = await start(tiny_model_dir, cache_dir, prefill_chunk_tokens=16, max_num_seqs=8)
    yield engine
    await engine.close()


async def test_short_prompts_chunked_beside_a_long_one_answer_the_same_and_first(
        whole: LocalEngine, small_chunks: LocalEngine) -> None:
    """Three streams decode (the pace cuts every prompt to 16 tokens a step); a 300-token prompt is chunked in its
    tier while two 40-token chats arrive and are chunked ahead of it in theirs, one after the other."""
    streams = [await small_chunks.submit([request(f"s{i}", ids(10, seed=20 + i), 100)]) for i in range(3)]
    readers = [aiter(generation) for [generation] in streams]
    for reader in readers:
        await anext(reader)  # they decode
    long_, quick = ids(300, seed=30), [ids(40, seed=31), ids(40, seed=32)]
    firsts: list[str] = []

    async def read(name: str, generation: Generation) -> str:
        text = ""
        async for delta in generation:
            if not text and delta.text:
                firsts.append(name)
            text += delta.text
        return text

    [late] = await small_chunks.submit([request("late", long_, 8)])  # first come: its chunks start first
    asked = [(await small_chunks.submit([request(f"q{i}", q, 8)]))[0] for i, q in enumerate(quick)]
    texts = await asyncio.gather(read("late", late), *(read(f"q{i}", g) for i, g in enumerate(asked)),
                                 *(answer(g) for [g] in streams))
    assert firsts == ["q0", "q1", "late"]
    for text, prompt in zip(texts, [long_, *quick], strict=False):
        assert text == await answer((await whole.submit([request("again", prompt, 8)]))[0])


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
    while s.chunking == [long_] or long_.cached == 0:
        left = 1000 - long_.cached
        step = run(s)
        assert step.decode == streams and step.prefill == [long_]
        chunks.append((left, step.chunks[0], long_.cached))
    assert len(chunks) > 5 and chunks[-1][2] == 1000
    assert all(end % ALIGN == 0 for left, chunk, end in chunks if left > 4 * chunk)
    assert sum(left > 4 * chunk for left, chunk, _ in chunks) > len(chunks) // 2
