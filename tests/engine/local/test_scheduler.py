"""Scheduler: prefill first when there is room, a padded-token budget, admission by the KV memory budget (a
sequence waits while its charge does not fit, and nothing is cut short), slots freed at the finish."""

from __future__ import annotations

import asyncio
import random

import torch

from inhouse.engine.base import Delta, SamplingParams
from inhouse.engine.collector import OutputCollector
from inhouse.engine.local.detokenizer import IncrementalDetokenizer, StopMatcher
from inhouse.engine.local.kv_tiers import KVTiers
from inhouse.engine.local.prefix_cache import BLOCK, PrefixCache
from inhouse.engine.local.scheduler import Scheduler
from inhouse.engine.local.sequence import Sequence, SequenceStatus


class _Tok:
    def decode(self, ids: list[int], **_: object) -> str:
        return "".join(chr(65 + i % 26) for i in ids)


def seq(request_id: str, prompt_len: int = 4, output_len: int = 0) -> Sequence:
    loop = asyncio.new_event_loop()
    prompt = list(range(1, prompt_len + 1))
    s = Sequence(request_id, prompt, SamplingParams(), 100, OutputCollector[Delta](loop),
                 IncrementalDetokenizer(_Tok(), prompt), StopMatcher(()))
    s.output_ids = [7] * output_len
    loop.close()
    return s


def tiers() -> KVTiers[Sequence]:
    return KVTiers(num_layers=2, kv_heads=1, head_dim=2, max_length=512, dtype=torch.float32,
                   device=torch.device("cpu"))


def scheduler(slots: int = 4, budget: int = 1000, memory: int = 10**6, prefix: bool = False) -> Scheduler:
    kv = tiers()
    cache = PrefixCache(kv.bytes_per_token, 2**30, "m") if prefix else None
    return Scheduler(kv, max_num_seqs=slots, max_prefill_tokens=budget, budget_tokens=memory, prefix=cache)


def assert_slots_compact(s: Scheduler) -> None:
    for k, members in enumerate(s.tiers.members):
        assert [q.slot for q in members] == list(range(len(members))) and all(q.tier == k for q in members)
    assert sorted(map(id, s.running)) == sorted(id(q) for members in s.tiers.members for q in members)
    assert all(q.status is SequenceStatus.RUNNING for q in s.running)
    assert all(q.slot == -1 and q.status is SequenceStatus.WAITING for q in s.waiting)


def test_nothing_to_do_is_none() -> None:
    s = scheduler()
    assert s.schedule() is None and not s.has_work()


def test_every_step_decodes_the_running_and_takes_waiting_prompts_beside_them() -> None:
    s = scheduler(slots=3)
    a, b = seq("a"), seq("b")
    s.add(a)
    first = s.schedule()
    assert first is not None and (first.decode, first.prefill) == ([], [a]) and a.slot == 0
    assert first.prompt_tokens == 4
    s.prefilled(first, first.prefill)
    decode = s.schedule()
    assert decode is not None and (decode.decode, decode.prefill) == ([a], [])
    s.add(b)  # a is running and there is room: b's prompt rides along with a's next token
    second = s.schedule()
    assert second is not None and (second.decode, second.prefill) == ([a], [b]) and second.seqs == [a, b]
    assert s.running == [a, b] and a.slot == 0 and b.slot == 1


def test_full_slots_decode_everything_running_and_waiting_waits() -> None:
    s = scheduler(slots=2)
    seqs = [seq(f"r{i}") for i in range(3)]
    for q in seqs:
        s.add(q)
    prefill = s.schedule()
    assert prefill is not None and prefill.prefill == seqs[:2]  # max_num_seqs bounds the batch
    s.prefilled(prefill, prefill.prefill)
    step = s.schedule()
    assert step is not None and step.decode == seqs[:2] and step.prefill == []
    assert list(s.waiting) == [seqs[2]] and seqs[2].status is SequenceStatus.WAITING
    step.decode.clear()  # the step holds its own list, not the running list
    assert s.running == seqs[:2]


def test_the_prompt_budget_counts_new_tokens() -> None:
    s = scheduler(slots=8, budget=40)
    short1, short2, long_ = seq("s1", 10), seq("s2", 10), seq("long", 30)
    for q in (short1, short2, long_):
        s.add(q)
    step = s.schedule()
    assert step is not None and step.prefill == [short1, short2] and step.prompt_tokens == 20  # 50 > 40
    s.prefilled(step, step.prefill)
    step = s.schedule()
    assert step is not None and step.prefill == [long_] and step.decode == [short1, short2]


def test_a_prompt_over_the_budget_still_runs_alone_with_chunking_off() -> None:
    s = scheduler(slots=4, budget=16)
    huge, small = seq("huge", 100), seq("small", 2)
    s.add(huge)
    s.add(small)
    step = s.schedule()
    assert step is not None and step.prefill == [huge] and step.chunks == [100]
    s.prefilled(step, step.prefill)
    step = s.schedule()
    assert step is not None and step.prefill == [small] and step.decode == [huge]


def test_batch_fills_up_to_the_budget_exactly() -> None:
    s = scheduler(slots=8, budget=40)
    seqs = [seq(f"r{i}", 10) for i in range(5)]
    for q in seqs:
        s.add(q)
    step = s.schedule()
    assert step is not None and step.prefill == seqs[:4]  # 4 × 10 == 40 is allowed, 5 × 10 is not


def test_finish_frees_the_slot_and_the_charge() -> None:
    s = scheduler(slots=4)
    a, b, c = seq("a", 3), seq("b", 4), seq("c", 5, output_len=2)
    for q in (a, b, c):
        s.add(q)
    s.schedule()
    assert s.charged == 3 * 256  # each may reach 3..5 + 100 tokens: the first tier's 256
    s.finish(a)
    assert s.running == [b, c] and c.slot == 0 and b.slot == 1  # the tier's last moved into the hole
    assert a.slot == a.tier == -1 and a.status is SequenceStatus.FINISHED
    assert s.charged == 2 * 256
    assert_slots_compact(s)
    s.finish(b)
    s.finish(c)
    assert s.running == [] and s.charged == 0 and not s.has_work()


def test_a_sequence_waits_while_its_memory_does_not_fit_and_is_never_cut_short() -> None:
    kv_slack = tiers().slack
    s = scheduler(slots=8, memory=2 * 256 + kv_slack)  # room for two sequences of up to 256 tokens
    seqs = [seq(f"r{i}", 10) for i in range(3)]
    for q in seqs:
        s.add(q)
    step = s.schedule()
    assert step is not None and step.prefill == seqs[:2]  # slots are free, memory is not
    assert list(s.waiting) == [seqs[2]] and s.fits(seqs[2]) is False
    s.prefilled(step, step.prefill)
    step = s.schedule()
    assert step is not None and not step.prefill
    s.finish(seqs[0])
    step = s.schedule()
    assert step is not None and step.prefill == [seqs[2]] and step.decode == [seqs[1]]
    assert seqs[2].max_tokens == 100  # admitted whole, when there was room
    long_ = seq("long", 300)  # 300 + 100 tokens: the 512 tier's charge, more than what is free
    s.add(long_)
    assert not s.fits(long_)
    s.finish(seqs[1])
    s.finish(seqs[2])
    assert s.charge(long_) == 512 and s.fits(long_)  # the whole budget: it runs once the others are gone
    step = s.schedule()
    assert step is not None and step.prefill == [long_]


def test_the_prefix_cache_gets_what_the_running_sequences_leave() -> None:
    s = scheduler(slots=8, memory=10_000, prefix=True)
    assert s.prefix is not None
    per_token = s.tiers.bytes_per_token
    assert s.prefix.limit_bytes == (10_000 - s.tiers.slack) * per_token
    a = seq("a", 300)
    s.add(a)
    s.schedule()
    assert s.prefix.limit_bytes == (10_000 - 512 - s.tiers.slack) * per_token
    s.finish(a)
    assert s.prefix.limit_bytes == (10_000 - s.tiers.slack) * per_token


def test_spare_rows_get_what_the_prefix_cache_budget_leaves() -> None:
    """Spare rows (``KVTiers.keep_spare``) come after the prefix cache's whole budget, so they never cost it a block;
    with none left, none are kept."""
    kv = tiers()
    per_token = kv.bytes_per_token
    cache = PrefixCache(per_token, 2_000 * per_token, "m")
    s = Scheduler(kv, max_num_seqs=8, max_prefill_tokens=1000, budget_tokens=20_000, prefix=cache)
    assert kv.spare_room == 20_000 - kv.slack - 2_000
    a = seq("a", 300)
    s.add(a)
    s.schedule()
    assert kv.spare_room == 20_000 - kv.slack - 2_000 - 512
    s.finish(a)
    assert kv.spare_room == 20_000 - kv.slack - 2_000
    assert kv.tiers[1].rows > 0 and kv.spare_tokens > 0  # a's rows stayed for the next arrival
    tight = Scheduler(tiers(), max_num_seqs=8, max_prefill_tokens=1000, budget_tokens=kv.slack + 2_500,
                      prefix=PrefixCache(per_token, 2_000 * per_token, "m"))
    b = seq("b", 300)
    tight.add(b)
    tight.schedule()
    assert tight.tiers.spare_room == 0
    tight.finish(b)
    assert tight.tiers.spare_tokens == 0 and tight.tiers.allocated_bytes == 0  # 2,500 - 2,000 < b's 512


def test_an_answered_sequence_leaves_its_answer_to_the_prefix_cache_for_the_next_turn() -> None:
    """A chat's next turn resends the answer: the cache keeps the whole blocks of prompt and answer alike (every
    token but the last sampled one, whose keys were never computed); a request that ends otherwise keeps none."""
    s = scheduler(prefix=True)
    assert s.prefix is not None
    a = seq("a", 100)
    s.add(a)
    step = s.schedule()
    assert step is not None
    s.tiers.cache(a).reserve(1, 256)  # what the runner's writes would have grown it to
    s.prefilled(step, [a])
    assert s.prefix.match([*a.prompt_ids, 0], None) == 0  # kept once its first token is handed out:
    s.save_prefixes()
    assert s.prefix.match([*a.prompt_ids, 0], None) == BLOCK  # the prompt's one whole block
    a.output_ids = list(range(500, 500 + 93))  # 100 + 92 run = 192: three whole blocks
    s.finish(a, answered=True)
    next_turn = a.prompt_ids + a.output_ids + [9, 9, 9]
    assert s.prefix.match(next_turn, None) == 3 * BLOCK
    b = seq("b", 100)
    b.prompt_ids = list(range(2000, 2100))
    s.add(b)
    step = s.schedule()
    assert step is not None
    s.tiers.cache(b).reserve(1, 256)
    s.prefilled(step, [b])
    b.output_ids = list(range(500, 600))
    s.finish(b)  # cancelled or failed: its answer is not kept
    assert s.prefix.match(b.prompt_ids + b.output_ids + [9], None) == BLOCK


def test_finishing_a_waiting_sequence_takes_it_off_the_queue() -> None:
    s = scheduler(slots=1)
    a, b, c = seq("a"), seq("b"), seq("c")
    for q in (a, b, c):
        s.add(q)
    s.schedule()  # a runs; b and c wait
    s.finish(b)
    assert list(s.waiting) == [c] and s.running == [a]
    assert b.status is SequenceStatus.FINISHED and b.slot == -1
    s.finish(b)  # finishing it twice (an abort racing its end) is harmless
    assert list(s.waiting) == [c] and s.running == [a]


def test_find_looks_in_running_then_waiting() -> None:
    s = scheduler(slots=1)
    a, b = seq("a"), seq("b")
    s.add(a)
    s.add(b)
    assert s.find("a") is a and s.find("b") is b
    s.schedule()
    assert s.find("a") is a and s.find("b") is b
    s.finish(a)
    assert s.find("a") is None and s.find("nobody") is None


def test_slots_stay_compact_through_random_arrivals_and_departures() -> None:
    rng = random.Random(7)
    s = scheduler(slots=5, budget=64)
    live: list[Sequence] = []
    for i in range(300):
        if rng.random() < 0.5:
            q = seq(f"r{i}", rng.randint(1, 20), rng.randint(0, 5))
            s.add(q)
            live.append(q)
        elif live:
            q = live.pop(rng.randrange(len(live)))
            s.finish(q)
            assert q.slot == -1 and s.find(q.request_id) is None
        step = s.schedule()
        if step is not None:
            assert step.prefill == s.running[len(s.running) - len(step.prefill):]
            assert not set(step.decode) & set(step.prefill)
            s.prefilled(step, step.prefill)
        assert_slots_compact(s)
        assert len(s.running) <= 5
        assert set(s.running) | set(s.waiting) == set(live)
