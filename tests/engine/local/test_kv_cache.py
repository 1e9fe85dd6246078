"""SlotKVCache (one tier): rows in groups and capacity in multiples of 128 kept near need, never above the bound
but for one asked-for length, exact moves and copies, writes read back where they belong."""

from __future__ import annotations

import pytest
import torch

from inhouse.engine.local.kv_cache import SlotKVCache


def cache(bound: int = 4096, slots: int = 3, layers: int = 2, kv_heads: int = 2, head_dim: int = 4,
          dtype: torch.dtype = torch.float32, row_group: int = 1) -> SlotKVCache:
    kv = SlotKVCache(num_layers=layers, kv_heads=kv_heads, head_dim=head_dim, bound=bound, dtype=dtype,
                     device=torch.device("cpu"), row_group=row_group)
    if slots:
        kv.reserve(slots, 1)
    return kv


def fill_slot(kv: SlotKVCache, slot: int, length: int, base: float) -> None:
    """Position p of ``slot`` holds base + p in keys and -(base + p) in values, on every layer and head."""
    with torch.inference_mode():
        marks = base + torch.arange(length, dtype=kv.dtype).view(1, -1, 1)
        for layer in range(kv.num_layers):
            kv.keys[layer][slot, :, :length].copy_(marks.expand(kv.kv_heads, length, kv.head_dim) + layer)
            kv.values[layer][slot, :, :length].copy_(-marks.expand(kv.kv_heads, length, kv.head_dim) - layer)


def assert_slot_holds(kv: SlotKVCache, slot: int, length: int, base: float) -> None:
    marks = base + torch.arange(length, dtype=kv.dtype).view(1, -1, 1)
    for layer in range(kv.num_layers):
        keys, values = kv.window(layer, kv.rows)
        assert torch.equal(keys[slot, :, :length], marks.expand(kv.kv_heads, length, kv.head_dim) + layer)
        assert torch.equal(values[slot, :, :length], -marks.expand(kv.kv_heads, length, kv.head_dim) - layer)


def test_starts_empty_and_a_first_reserve_is_one_granule_of_zeros() -> None:
    kv = cache(slots=0)
    assert (kv.rows, kv.capacity, kv.allocated_bytes, kv.keys) == (0, 0, 0, [])
    kv.reserve(3, 1)
    assert kv.capacity == 128 and kv.rows == 3
    assert len(kv.keys) == len(kv.values) == 2
    assert kv.keys[0].shape == (3, 2, 128, 4) and kv.keys[0].dtype is torch.float32
    assert all((t == 0).all() for t in kv.keys + kv.values)
    assert kv.allocated_bytes == 3 * 128 * kv.bytes_per_token


def test_bytes_per_token_counts_keys_and_values_of_every_layer() -> None:
    assert cache(layers=2, kv_heads=2, head_dim=4).bytes_per_token == 2 * 2 * 2 * 4 * 4
    assert cache(layers=3, kv_heads=1, head_dim=8, dtype=torch.bfloat16).bytes_per_token == 2 * 3 * 1 * 8 * 2


@pytest.mark.parametrize(("length", "capacity"), [
    (1, 128), (128, 128),  # within what is there: nothing changes
    (100, 128),  # 100 + 25 (a quarter, when that is less than 32) = 125 → 128
    (129, 256),  # 129 + 32 = 161 → 256
    (224, 256),  # 224 + 32 = 256 exactly
    (225, 384),  # 225 + 32 = 257: the room ahead crosses into the next granule
    (1000, 1152),  # 1000 + 32 = 1032 → 1152: a decode step reads the whole capacity, so little more than needed
])
def test_reserve_grows_32_tokens_ahead_in_multiples_of_128(length: int, capacity: int) -> None:
    kv = cache()
    kv.reserve(3, length)
    assert kv.capacity == capacity and kv.capacity % 128 == 0
    assert all(t.shape[2] == capacity for t in kv.keys + kv.values)


def test_rows_grow_in_whole_groups() -> None:
    kv = cache(slots=0, row_group=4)
    kv.reserve(1, 10)
    assert kv.rows == 4
    kv.reserve(4, 10)
    assert kv.rows == 4
    kv.reserve(5, 10)
    assert kv.rows == 8


def test_reserve_never_shrinks() -> None:
    kv = cache()
    kv.reserve(3, 1000)
    kv.reserve(1, 10)
    assert (kv.rows, kv.capacity) == (3, 1152)


def test_growth_stops_at_the_bound_unless_more_is_needed() -> None:
    kv = cache(bound=300)
    kv.reserve(3, 260)  # 32 ahead would be 384; the tier never holds more than 300
    assert kv.capacity == 300
    kv.reserve(3, 300)
    assert kv.capacity == 300
    kv.reserve(3, 350)  # asked for more than the bound: exactly that, nothing ahead
    assert kv.capacity == 350


def test_fit_gives_capacity_back_once_two_granules_are_spare() -> None:
    kv = cache()
    kv.reserve(3, 1000)
    assert kv.capacity == 1152
    kv.fit(3, 865)  # 865 needs 1024 (865 + 32 → 1024): 128 spare, not worth a copy
    assert kv.capacity == 1152
    kv.fit(3, 864)  # 864 needs 896: 256 spare, given back
    assert kv.capacity == 896
    kv.fit(3, 10)
    assert kv.capacity == 128


def test_fit_gives_rows_back_when_a_whole_group_is_free() -> None:
    kv = cache(slots=0, row_group=4)
    kv.reserve(8, 100)
    kv.fit(5, 100)  # 3 free: less than a group, kept (no copy for one sequence leaving)
    assert kv.rows == 8
    kv.fit(4, 100)  # a whole group free: given back
    assert kv.rows == 4
    kv.fit(0, 100)  # nobody left: everything
    assert (kv.rows, kv.capacity, kv.allocated_bytes) == (0, 0, 0)


def test_fit_grows_like_reserve() -> None:
    kv = cache()
    kv.fit(3, 225)
    assert kv.capacity == 384


def test_fit_near_the_minimum_does_not_thrash() -> None:
    kv = cache()
    kv.reserve(3, 129)
    assert kv.capacity == 256
    kv.fit(3, 1)  # 1 needs 128: one granule spare is kept, no reallocation for it
    assert kv.capacity == 256


def test_clear_forgets_everything() -> None:
    kv = cache()
    kv.reserve(3, 500)
    fill_slot(kv, 0, 100, base=1.0)
    kv.clear()
    assert (kv.rows, kv.capacity, kv.keys, kv.values) == (0, 0, [], [])
    kv.reserve(3, 1)
    assert all((t == 0).all() for t in kv.keys + kv.values)


def test_contents_survive_growing() -> None:
    kv = cache()
    fill_slot(kv, 0, 128, base=1.0)
    fill_slot(kv, 2, 50, base=500.0)
    kv.reserve(5, 700)
    assert (kv.rows, kv.capacity) == (5, 768)
    assert_slot_holds(kv, 0, 128, base=1.0)
    assert_slot_holds(kv, 2, 50, base=500.0)
    assert all((t[:, :, 128:] == 0).all() and (t[3:] == 0).all() for t in kv.keys + kv.values)


def test_contents_within_the_new_size_survive_shrinking() -> None:
    kv = cache(slots=0, row_group=2)
    kv.reserve(4, 1000)
    fill_slot(kv, 1, 300, base=7.0)
    kv.fit(2, 100)
    assert (kv.rows, kv.capacity) == (2, 128)
    assert_slot_holds(kv, 1, 128, base=7.0)


def test_read_and_load_carry_a_slot_to_another_tier() -> None:
    small, large = cache(bound=256), cache(bound=1024)
    fill_slot(small, 1, 100, base=3.0)
    large.reserve(3, 300)
    large.load(small.read(1, 0, 100), 2, 0)
    assert_slot_holds(large, 2, 100, base=3.0)
    block = small.read(1, 64, 32)  # a part, from an offset (the prefix cache's blocks)
    assert block.shape == (2, 2, 2, 32, 4)
    assert torch.equal(block[1, 0, 0, :, 0], 3.0 + torch.arange(64, 96, dtype=torch.float32) + 1)


def test_move_copies_exactly_length_positions_of_every_layer() -> None:
    kv = cache()
    fill_slot(kv, 2, 128, base=10.0)
    fill_slot(kv, 0, 128, base=1000.0)
    kv.move(2, 0, 37)
    assert_slot_holds(kv, 0, 37, base=10.0)
    for layer in range(kv.num_layers):
        keys, values = kv.window(layer, 1)
        rest = 1000.0 + torch.arange(37, 128, dtype=kv.dtype) + layer
        assert torch.equal(keys[0, 0, 37:, 0], rest)  # beyond length: untouched
        assert torch.equal(values[0, 1, 37:, 3], -rest)
    assert_slot_holds(kv, 2, 128, base=10.0)  # the source is left as it was


def test_move_onto_itself_or_of_nothing_is_a_no_op() -> None:
    kv = cache()
    fill_slot(kv, 0, 20, base=1.0)
    fill_slot(kv, 1, 20, base=50.0)
    kv.move(1, 1, 20)
    kv.move(0, 1, 0)
    assert_slot_holds(kv, 1, 20, base=50.0)


def test_rows_at_writes_each_token_and_head_where_window_reads_it() -> None:
    kv = cache(slots=3, kv_heads=2, head_dim=4)
    kv.reserve(3, 200)  # a capacity other than 128, so the row arithmetic must use it
    slots = torch.tensor([0, 2, 2, 1])
    positions = torch.tensor([5, 0, 199, 64])
    tokens = len(slots)
    key = torch.arange(tokens * 2 * 4, dtype=torch.float32).view(tokens, 2, 4) + 1
    value = -key
    rows = kv.rows_at(slots, positions)
    assert rows.shape == (tokens * 2,)
    with torch.inference_mode():  # the runner writes under inference mode; the tensors are inference tensors
        kv.write(1, rows, key, value)
    keys, values = kv.window(1, 3)
    for t in range(tokens):
        for head in range(2):
            assert torch.equal(keys[slots[t], head, positions[t]], key[t, head])
            assert torch.equal(values[slots[t], head, positions[t]], value[t, head])
    assert int((keys != 0).sum()) == tokens * 2 * 4  # nothing else was touched
    assert (kv.keys[0] == 0).all()  # nor any other layer


def test_write_takes_batched_token_major_input() -> None:
    kv = cache(slots=2, kv_heads=2, head_dim=4)
    slots = torch.tensor([[0, 0], [1, 1]]).reshape(-1)
    positions = torch.tensor([[3, 4], [3, 4]]).reshape(-1)
    key = torch.randn(2, 2, 2, 4)  # [batch, tokens, kv_heads, head_dim]
    with torch.inference_mode():
        kv.write(0, kv.rows_at(slots, positions), key, key * 2)
    keys, values = kv.window(0, 2)
    assert torch.equal(keys[1, :, 4], key[1, 1]) and torch.equal(values[0, :, 3], 2 * key[0, 0])


def test_window_is_the_first_slots_over_the_whole_capacity_and_contiguous() -> None:
    kv = cache(slots=3)
    kv.reserve(3, 300)
    keys, values = kv.window(0, 2)
    assert keys.shape == values.shape == (2, 2, kv.capacity, 4)
    assert keys.is_contiguous() and values.is_contiguous()
    assert keys.data_ptr() == kv.keys[0].data_ptr()  # a view, not a copy


def test_write_slot_puts_one_sequences_tokens_from_an_offset() -> None:
    kv = cache(slots=2, kv_heads=2, head_dim=4)
    key = torch.randn(2, 5, 4)  # [kv_heads, tokens, head_dim]
    with torch.inference_mode():
        kv.write_slot(1, 1, 10, key, -key)
    keys, values = kv.window(1, 2)
    assert torch.equal(keys[1, :, 10:15], key) and torch.equal(values[1, :, 10:15], -key)
    assert int((keys != 0).sum()) == key.numel()
