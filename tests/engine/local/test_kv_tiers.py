"""KVTiers: sequences placed by length, memory by tokens held, moves up a tier that keep every key, the pinned
prompt always last of its tier, and the charges that bound what the tiers allocate."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from inhouse.engine.local.kv_tiers import KVTiers


@dataclass(eq=False)
class Seq:
    name: float  # what its keys hold: name + position (values: minus that)
    prompt_ids: list[int]
    output: int = 0
    cached: int = 0
    tier: int = -1
    slot: int = -1
    marks: int = field(default=0)  # positions written so far

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + self.output


def tiers(max_length: int = 3000, layers: int = 2) -> KVTiers[Seq]:
    return KVTiers(num_layers=layers, kv_heads=1, head_dim=2, max_length=max_length, dtype=torch.float32,
                   device=torch.device("cpu"))


def write(kv: KVTiers[Seq], seq: Seq, upto: int) -> None:
    """Positions ``seq.marks..upto`` of its slot hold its marks."""
    cache = kv.cache(seq)
    with torch.inference_mode():
        marks = seq.name + torch.arange(seq.marks, upto, dtype=torch.float32)
        for layer in range(cache.num_layers):
            cache.keys[layer][seq.slot, 0, seq.marks:upto] = marks.view(-1, 1)
            cache.values[layer][seq.slot, 0, seq.marks:upto] = -marks.view(-1, 1)
    seq.marks = upto


def assert_holds(kv: KVTiers[Seq], seq: Seq) -> None:
    cache = kv.cache(seq)
    marks = seq.name + torch.arange(seq.marks, dtype=torch.float32)
    for layer in range(cache.num_layers):
        assert torch.equal(cache.keys[layer][seq.slot, 0, : seq.marks, 0], marks), f"seq {seq.name} lost its keys"
        assert torch.equal(cache.values[layer][seq.slot, 0, : seq.marks, 1], -marks)


def assert_compact(kv: KVTiers[Seq]) -> None:
    for k, members in enumerate(kv.members):
        assert [s.slot for s in members] == list(range(len(members)))
        assert all(s.tier == k for s in members)
        assert kv.tiers[k].rows >= len(members)
        pinned = sum(s.tier == k for s in kv.pinned)
        assert {id(s) for s in members[len(members) - pinned :]} == {id(s) for s in kv.pinned if s.tier == k}


def test_tiers_double_from_256_and_the_last_is_the_context() -> None:
    kv = tiers(max_length=3000)
    assert kv.bounds == [256, 512, 1024, 2048, 3000]
    assert [kv.tier_for(n) for n in (1, 256, 257, 1024, 1025, 2049, 3000)] == [0, 0, 1, 2, 3, 4, 4]
    assert [kv.charge(n) for n in (10, 300, 2100, 99999)] == [256, 512, 3000, 3000]
    assert kv.slack == 7 * 256 + 3 * 512 + 1 * 1024  # row groups of 8, 4, 2, 1, 1


def test_memory_follows_the_tokens_held_not_the_longest_sequence() -> None:
    kv = tiers(max_length=8192)
    short = [Seq(i, [1] * 100) for i in range(15)]
    long_ = Seq(99, [1] * 3000)
    for s in [*short, long_]:
        kv.place(s, s.length + 1)
    assert long_.tier == kv.tier_for(3001) and {s.tier for s in short} == {0}
    held = kv.allocated_bytes // kv.bytes_per_token
    # 16 rows (15 short, in groups of 8) × 128, and one row of 3,001 + 32 rounded up: not 16 × 3,072
    assert held == 16 * 128 + 3072
    assert held < 16 * 3000 / 5
    rows = kv.prepare_decode()
    assert rows == [*short, long_]  # tier by tier, slot by slot


def test_remove_moves_the_last_into_the_hole_with_its_keys() -> None:
    kv = tiers()
    seqs = [Seq(1000.0 * i, [1] * 50) for i in range(4)]
    for s in seqs:
        kv.place(s, 51)
        write(kv, s, 50)
    kv.remove(seqs[1])
    assert seqs[1].tier == seqs[1].slot == -1
    assert kv.members[0] == [seqs[0], seqs[3], seqs[2]] and seqs[3].slot == 1
    for s in (seqs[0], seqs[2], seqs[3]):
        assert_holds(kv, s)
    kv.remove(seqs[1])  # not placed: nothing happens
    assert_compact(kv)


def test_a_sequence_outgrowing_its_tier_moves_up_with_every_key() -> None:
    kv = tiers()
    a, b = Seq(1.0, [1] * 250), Seq(500.0, [1] * 10)
    for s in (a, b):
        kv.place(s, s.length + 1)
        write(kv, s, s.length)
    a.output = 7  # 257 tokens: its next key goes to position 256, past the first tier
    rows = kv.prepare_decode()
    assert (a.tier, a.slot, b.tier, b.slot) == (1, 0, 0, 0)
    assert rows == [b, a]
    assert_holds(kv, a)
    assert_holds(kv, b)
    assert kv.tiers[1].capacity >= 257


def test_the_pinned_prompt_stays_last_of_its_tier() -> None:
    kv = tiers()
    a, b = Seq(1.0, [1] * 300), Seq(2000.0, [1] * 200)
    chunked = Seq(5000.0, [1] * 500)
    for s in (a, b):
        kv.place(s, s.length + 1)
        write(kv, s, s.length)
    kv.place(chunked, 501)
    kv.pin(chunked)
    write(kv, chunked, 128)  # a chunk of it is in
    chunked.cached = 128
    b.output = 57  # 257 tokens: b moves up into the pinned prompt's tier, before it
    rows = kv.prepare_decode()
    assert kv.members[1] == [a, b, chunked] and rows == [a, b]
    assert kv.tiers[1].capacity >= 500  # room for the whole prompt being chunked
    for s in (a, b, chunked):
        assert_holds(kv, s)
    kv.remove(a)  # the last decoding one fills the hole; the pinned moves down a slot and stays last
    assert kv.members[1] == [b, chunked] and chunked.slot == 1
    for s in (b, chunked):
        assert_holds(kv, s)
    assert_compact(kv)


def test_pinned_prompts_stay_the_last_of_their_tier_through_arrivals_departures_and_unpinning() -> None:
    kv = tiers()
    a = Seq(1.0, [1] * 20)
    long_, short, other = Seq(5000.0, [1] * 500), Seq(9000.0, [1] * 60), Seq(7000.0, [1] * 40)
    kv.place(a, 21)
    write(kv, a, 20)
    for s, held in ((long_, 64), (short, 32), (other, 16)):  # two chats pinned in the first tier, a prompt in the next
        kv.place(s, s.length + 1)
        kv.pin(s)
        write(kv, s, held)
        s.cached = held
    late = Seq(3000.0, [1] * 10)
    assert kv.members[0] == [a, other, short]  # each placed before those pinned already
    kv.place(late, 11)  # before the pinned ones of its tier: the first of them moves to the end, with its keys
    write(kv, late, 10)
    assert kv.members[0] == [a, late, short, other] and kv.prepare_decode() == [a, late]
    assert_compact(kv)
    write(kv, other, 40)
    other.cached = 40
    kv.unpin(other)  # whole: it decodes, from the first pinned slot (traded with the one there)
    assert kv.members[0] == [a, late, other, short] and kv.prepare_decode() == [a, late, other]
    write(kv, short, 60)
    short.cached = 60
    kv.remove(late)  # the last decoding one fills its hole, the pinned one that decoding one's
    assert kv.members[0] == [a, other, short] and kv.pinned == [long_, short]
    kv.remove(a)
    assert kv.members[0] == [other, short]
    kv.unpin(short)
    assert kv.prepare_decode() == [other, short] and kv.pinned == [long_]
    for s in (other, short, long_):
        assert_holds(kv, s)
    assert_compact(kv)


def test_unpinning_a_prompt_behind_another_pinned_one_trades_their_slots_and_keys() -> None:
    kv = tiers()
    a, first, second = Seq(1.0, [1] * 20), Seq(3000.0, [1] * 60), Seq(6000.0, [1] * 50)
    kv.place(a, 21)
    write(kv, a, 20)
    for s, held in ((first, 60), (second, 16)):
        kv.place(s, s.length + 1)
        kv.pin(s)
        write(kv, s, held)
        s.cached = held
    assert kv.members[0] == [a, second, first]
    kv.unpin(first)  # whole before the other: it takes the first pinned slot, the other one its own
    assert kv.members[0] == [a, first, second] and (first.slot, second.slot) == (1, 2)
    assert kv.prepare_decode() == [a, first]
    for s in (a, first, second):
        assert_holds(kv, s)
    kv.remove(second)  # a pinned one aborted
    assert kv.members[0] == [a, first] and kv.pinned == []
    assert_compact(kv)


def test_a_departure_leaves_a_spare_row_the_next_arrival_takes_without_a_copy() -> None:
    kv = tiers()
    kv.keep_spare(10_000)
    a, b = Seq(1000.0, [1] * 2100), Seq(2000.0, [1] * 2200)  # both in the last tier (row group 1)
    for s in (a, b):
        kv.place(s, s.length + 1)
        write(kv, s, s.length)
    tier = kv.tiers[a.tier]
    kv.remove(a)  # b moves into slot 0; the tier keeps its second row
    assert tier.rows == 2 and kv.spare_tokens == tier.capacity
    assert_holds(kv, b)
    kv.prepare_decode()  # a decode step keeps the spare too
    assert tier.rows == 2
    storage = tier.keys[0].data_ptr()
    c = Seq(3000.0, [1] * 2150)
    kv.place(c, c.length + 1)
    assert c.slot == 1 and tier.keys[0].data_ptr() == storage  # the spare row, not a new tier
    assert kv.spare_tokens == 0


def test_spares_stay_within_their_room() -> None:
    kv = tiers()
    a, b, c = Seq(1000.0, [1] * 2100), Seq(2000.0, [1] * 2200), Seq(3000.0, [1] * 100)
    for s in (a, b, c):
        kv.place(s, s.length + 1)
    kv.remove(a)  # no room for spares (the default): the row is given back, as before spares
    assert kv.tiers[b.tier].rows == 1 and kv.spare_tokens == 0
    kv.keep_spare(10_000)
    kv.remove(c)  # the small tier keeps its row group (8 rows of 256), now empty
    assert kv.tiers[0].rows == 8 and kv.spare_tokens == 8 * kv.tiers[0].capacity
    kv.keep_spare(100)  # less room: given back at once
    assert kv.tiers[0].rows == 0 and kv.spare_tokens == 0


def test_random_arrivals_growth_and_departures_keep_keys_slots_and_the_charge_bound() -> None:
    for spare_room in (0, 1500):
        walk(spare_room)


def walk(spare_room: int) -> None:
    rng = random.Random(7)
    kv = tiers(max_length=2048)
    kv.keep_spare(spare_room)
    spared = 0  # steps that ended with a spare row kept
    running: list[Seq] = []
    most = {}  # each running sequence's most tokens: its charge
    for step in range(300):
        if running and rng.random() < 0.25:
            gone = running.pop(rng.randrange(len(running)))
            kv.remove(gone)
            del most[id(gone)]
        if len(running) < 12 and rng.random() < 0.5:
            s = Seq(10_000.0 * step, [1] * rng.randint(1, 1200))
            most[id(s)] = s.length + rng.randint(1, 2048 - s.length)
            kv.place(s, s.length + 1)
            write(kv, s, s.length)
            running.append(s)
        for s in running:  # a decode step: one more token each, until its most
            s.output += 1 if s.length < most[id(s)] else 0
        rows = kv.prepare_decode()
        assert sorted(map(id, rows)) == sorted(map(id, running))
        for s in running:
            write(kv, s, s.length)
            assert_holds(kv, s)
        assert_compact(kv)
        charged = sum(kv.charge(m) for m in most.values())
        assert kv.spare_tokens <= spare_room
        spared += kv.spare_tokens > 0
        assert kv.allocated_bytes <= (charged + kv.slack + spare_room) * kv.bytes_per_token
    assert (spared > 50) == (spare_room > 0)
    for s in list(running):
        kv.remove(s)
    kv.shrink()
    assert kv.allocated_bytes == 0


def test_a_lone_arrival_that_grows_a_tier_copies_none_of_what_left_it() -> None:
    """The spare row a finished sequence left holds nothing worth keeping: a longer prompt arriving alone gets the
    grown tier zeroed, with no copy of the old row (for a long prompt, 20-50 MB a time); beside another sequence,
    that one's keys are copied as before."""
    kv = tiers()
    kv.keep_spare(10_000)
    gone = Seq(1000.0, list(range(1030)))  # the 2,048 tier
    kv.place(gone, gone.length + 1)
    write(kv, gone, gone.length)
    kv.remove(gone)
    tier = kv.tiers[gone_tier := kv.tier_for(1031)]
    assert tier.rows == 1 and tier.capacity < 1500  # its row kept as the spare
    alone = Seq(2000.0, list(range(1500)))
    kv.place(alone, alone.length + 1)
    assert alone.tier == gone_tier and tier.capacity >= 1501
    assert all(not t.any() for t in tier.keys + tier.values)  # zeros: the spare's old keys were not copied
    write(kv, alone, alone.length)
    beside = Seq(3000.0, list(range(1900)))
    kv.place(beside, beside.length + 1)
    assert beside.tier == gone_tier
    assert_holds(kv, alone)  # a sequence's keys survive a growth beside it
