"""Scheduler: prefill first when there is room, a padded-token budget, running[i] always in slot i."""

from __future__ import annotations

import asyncio
import random

import torch

from inhouse.engine.base import Delta, SamplingParams
from inhouse.engine.collector import OutputCollector
from inhouse.engine.local.detokenizer import IncrementalDetokenizer, StopMatcher
from inhouse.engine.local.kv_cache import SlotKVCache
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


def cache(slots: int = 4) -> SlotKVCache:
    return SlotKVCache(num_layers=2, num_slots=slots, kv_heads=1, head_dim=2, max_length=512,
                       dtype=torch.float32, device=torch.device("cpu"))


def scheduler(slots: int = 4, budget: int = 1000) -> Scheduler:
    return Scheduler(cache(slots), max_num_seqs=slots, max_prefill_tokens=budget)


def assert_slots_compact(s: Scheduler) -> None:
    assert [q.slot for q in s.running] == list(range(len(s.running)))
    assert all(q.status is SequenceStatus.RUNNING for q in s.running)
    assert all(q.slot == -1 and q.status is SequenceStatus.WAITING for q in s.waiting)


def test_nothing_to_do_is_none() -> None:
    s = scheduler()
    assert s.schedule() is None and not s.has_work()


def test_prefill_goes_first_whenever_a_slot_is_free() -> None:
    s = scheduler(slots=3)
    a, b = seq("a"), seq("b")
    s.add(a)
    first = s.schedule()
    assert first is not None and first.is_prefill and first.seqs == [a] and first.first_slot == 0
    decode = s.schedule()
    assert decode is not None and not decode.is_prefill and decode.seqs == [a]
    s.add(b)  # a is running, but there is room: b is prefilled before a decodes again
    second = s.schedule()
    assert second is not None and second.is_prefill and second.seqs == [b] and second.first_slot == 1
    assert s.running == [a, b] and a.slot == 0 and b.slot == 1


def test_full_slots_decode_everything_running_and_waiting_waits() -> None:
    s = scheduler(slots=2)
    seqs = [seq(f"r{i}") for i in range(3)]
    for q in seqs:
        s.add(q)
    prefill = s.schedule()
    assert prefill is not None and prefill.seqs == seqs[:2]  # max_num_seqs bounds the batch
    step = s.schedule()
    assert step is not None and not step.is_prefill and step.seqs == seqs[:2]
    assert list(s.waiting) == [seqs[2]] and seqs[2].status is SequenceStatus.WAITING
    step.seqs.clear()  # the step holds its own list, not the running list
    assert s.running == seqs[:2]


def test_prefill_budget_counts_padded_tokens() -> None:
    s = scheduler(slots=8, budget=40)
    short1, short2, long_ = seq("s1", 10), seq("s2", 10), seq("long", 30)
    for q in (short1, short2, long_):
        s.add(q)
    step = s.schedule()
    # 10 + 10 real tokens fit; adding the 30-token prompt pads all three to 30 → 90 > 40
    assert step is not None and step.seqs == [short1, short2]
    step = s.schedule()
    assert step is not None and step.is_prefill and step.seqs == [long_] and step.first_slot == 2


def test_padding_not_real_tokens_is_what_the_budget_bounds() -> None:
    s = scheduler(slots=8, budget=40)
    long_, short = seq("long", 30), seq("short", 5)
    s.add(long_)
    s.add(short)
    step = s.schedule()
    # 35 real tokens would fit in 40, but left-padded to 30 each the batch is 60
    assert step is not None and step.seqs == [long_]
    assert list(s.waiting) == [short]


def test_a_prompt_over_the_budget_still_runs_alone() -> None:
    s = scheduler(slots=4, budget=16)
    huge, small = seq("huge", 100), seq("small", 2)
    s.add(huge)
    s.add(small)
    step = s.schedule()
    assert step is not None and step.seqs == [huge]
    step = s.schedule()
    assert step is not None and step.seqs == [small]


def test_batch_fills_up_to_the_budget_exactly() -> None:
    s = scheduler(slots=8, budget=40)
    seqs = [seq(f"r{i}", 10) for i in range(5)]
    for q in seqs:
        s.add(q)
    step = s.schedule()
    assert step is not None and step.seqs == seqs[:4]  # 4 × 10 == 40 is allowed, 5 × 10 is not


def test_finish_moves_the_last_running_sequence_into_the_freed_slot() -> None:
    s = scheduler(slots=4)
    a, b, c = seq("a", 3), seq("b", 4), seq("c", 5, output_len=2)  # c.length == 7
    for q in (a, b, c):
        s.add(q)
    s.schedule()
    kv = s.cache
    with torch.inference_mode():
        for layer in range(kv.num_layers):
            kv.keys[layer][0].fill_(-1.0)
            kv.values[layer][0].fill_(-2.0)
            positions = torch.arange(kv.capacity, dtype=torch.float32).view(1, -1, 1)
            kv.keys[layer][2].copy_(positions.expand_as(kv.keys[layer][2]) + 100 * layer)
            kv.values[layer][2].copy_(-positions.expand_as(kv.values[layer][2]) - 100 * layer)

    s.finish(a)

    assert s.running == [c, b] and c.slot == 0 and b.slot == 1
    assert a.slot == -1 and a.status is SequenceStatus.FINISHED
    for layer in range(kv.num_layers):
        keys, values = kv.window(layer, 1)
        expected = torch.arange(c.length, dtype=torch.float32) + 100 * layer
        assert torch.equal(keys[0, 0, : c.length, 0], expected)
        assert torch.equal(values[0, 0, : c.length, 0], -expected)
        # exactly c.length positions moved: what lies beyond is slot 0's old content
        assert (keys[0, :, c.length:] == -1.0).all() and (values[0, :, c.length:] == -2.0).all()
    assert_slots_compact(s)


def test_finishing_the_last_running_sequence_moves_nothing() -> None:
    s = scheduler(slots=3)
    a, b = seq("a"), seq("b")
    s.add(a)
    s.add(b)
    s.schedule()
    with torch.inference_mode():
        s.cache.keys[0][1].fill_(5.0)
        s.cache.keys[0][0].fill_(1.0)
    s.finish(b)
    assert s.running == [a] and a.slot == 0 and b.slot == -1
    assert (s.cache.keys[0][0] == 1.0).all()  # slot 0 untouched
    s.finish(a)
    assert s.running == [] and not s.has_work()


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
        if step is not None and step.is_prefill:
            assert step.seqs == s.running[step.first_slot:]
        assert_slots_compact(s)
        assert len(s.running) <= 5
        assert set(s.running) | set(s.waiting) == set(live)
