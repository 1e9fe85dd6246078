"""The attention of the local engine on random bf16 tensors: a long prompt's prefill (``attention._prefill``), in
blocks and by flash attention, against PyTorch's SDPA, a prefill after a cached prefix or in chunks against a
whole one, bit for bit, which CPUs take the flash way, and a lone long sequence's decode, which the runner sends
the batched way (``_decode_group`` with a mask) rather than SDPA's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from inhouse.engine.local import attention
from inhouse.engine.local.attention import (
    BLOCKED_FROM,
    FLASH_BLOCK,
    QUERY_BLOCK,
    BatchLayout,
    DecodeGroup,
    Placement,
    _decode_group,
    _prefill,
    flash_masks,
    prefers_flash,
)
from inhouse.engine.local.kv_cache import SlotKVCache
from inhouse.engine.local.kv_tiers import KVTiers
from inhouse.engine.local.runner import ModelRunner, _decode_mask
from tests.engine.local.test_scheduler import seq

HEADS, KV_HEADS, DIM = 9, 3, 64  # SmolLM2's grouped-query shapes


def qkv(length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, heads, length, DIM, generator=g).to(torch.bfloat16)  # type: ignore[return-value]
                 for heads in (HEADS, KV_HEADS, KV_HEADS))


def cache(slots: int, length: int) -> SlotKVCache:
    kv = SlotKVCache(1, KV_HEADS, DIM, bound=1024, dtype=torch.bfloat16, device=torch.device("cpu"))
    kv.reserve(slots, length)
    return kv


@torch.inference_mode()
def prefill(kv: SlotKVCache, slot: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int,
            scale: float = DIM**-0.5, flash: bool = False, end: int | None = None) -> torch.Tensor:
    """Attention of positions ``offset..end`` of the prompt (its keys before ``offset`` already in the slot), in
    blocks (or by the kernel's way) or, with ``flash``, the flash way."""
    end = q.shape[2] if end is None else end
    new = (slice(None), slice(None), slice(offset, end))
    masks = flash_masks(offset, end - offset, kv.capacity, q.dtype, q.device) if flash else ()
    layout = BatchLayout(placements=(Placement(kv, slot, 0, end - offset, offset, masks),))
    out = q.new_empty((1, end - offset, HEADS, DIM))
    _prefill(layout, 0, q[new], k[new], v[new], scale, out)
    return out.transpose(1, 2)


@pytest.mark.parametrize("flash", [False, True], ids=["blocks", "flash"])
@pytest.mark.parametrize("scale", [DIM**-0.5, 0.1])  # a power of two scales the queries first; 0.1, the scores
@pytest.mark.parametrize("length", [BLOCKED_FROM, 300, 700])
def test_a_long_prompt_attends_as_sdpa_does(length: int, scale: float, flash: bool) -> None:
    q, k, v = qkv(length, seed=length)
    got = prefill(cache(1, length), 0, q, k, v, offset=0, scale=scale, flash=flash)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.02)  # bf16 scores, as transformers' eager attention


@pytest.mark.parametrize("flash", [False, True], ids=["blocks", "flash"])
@pytest.mark.parametrize("cached", [QUERY_BLOCK, 3 * QUERY_BLOCK, 4 * QUERY_BLOCK])
def test_after_a_cached_prefix_each_token_is_computed_as_in_a_whole_prefill(cached: int, flash: bool) -> None:
    q, k, v = qkv(333, seed=cached)
    kv = cache(2, 333)
    whole = prefill(kv, 0, q, k, v, offset=0, flash=flash)
    kv.move(0, 1, cached)  # slot 1 holds the prefix, as the prefix cache leaves it
    rest = prefill(kv, 1, q, k, v, offset=cached, flash=flash)
    assert torch.equal(rest, whole[:, :, cached:])
    assert torch.equal(kv.keys[0][1, :, :333], kv.keys[0][0, :, :333])


@pytest.mark.parametrize("chunk", [16, 48, 100, FLASH_BLOCK, 200])
def test_the_flash_way_in_chunks_computes_each_token_as_a_whole_prefill(chunk: int) -> None:
    """Chunks that end inside a block of queries, on one's edge and past it: each token's bits are the whole
    prompt's (its block reads the keys up to the block's end, whatever this chunk wrote)."""
    length = 700
    q, k, v = qkv(length, seed=chunk)
    kv = cache(2, length)
    whole = prefill(kv, 0, q, k, v, offset=0, flash=True)
    parts = [prefill(kv, 1, q, k, v, offset=start, flash=True, end=min(start + chunk, length))
             for start in range(0, length, chunk)]
    assert torch.equal(torch.cat(parts, dim=2), whole)


def test_flash_masks_cover_each_block_of_queries_to_its_end() -> None:
    masks = flash_masks(100, 300, 512, torch.bfloat16, torch.device("cpu"))  # positions 100..399
    assert [tuple(m.shape) for m in masks] == [(28, 128), (128, 256), (128, 384), (16, 512)]
    first = masks[0]  # position 100 sees keys 0..100
    assert (first[0, :101] == 0).all() and (first[0, 101:] == float("-inf")).all()
    assert flash_masks(0, 130, 130, torch.bfloat16, torch.device("cpu"))[-1].shape == (2, 130)  # the slot's end


def test_only_a_cpu_with_amx_prefers_flash(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(attention, "_amx_enabled", lambda: True)
    monkeypatch.setattr(attention, "cpu_has", lambda flag: flag == "amx_bf16")
    assert prefers_flash(cpu, torch.bfloat16)
    assert not prefers_flash(cpu, torch.float32)
    assert not prefers_flash(torch.device("meta"), torch.bfloat16)
    monkeypatch.setattr(attention, "cpu_has", lambda flag: False)
    assert not prefers_flash(cpu, torch.bfloat16)
    monkeypatch.setattr(attention, "cpu_has", lambda flag: True)
    monkeypatch.setattr(attention, "_amx_enabled", lambda: False)  # the kernel did not grant the tiles
    assert not prefers_flash(cpu, torch.bfloat16)


def test_the_runner_gives_masks_to_long_bf16_prompts_on_the_flash_way() -> None:
    tiers = KVTiers(num_layers=1, kv_heads=KV_HEADS, head_dim=DIM, max_length=1024, dtype=torch.bfloat16,
                    device=torch.device("cpu"))
    short, long_ = seq("short", BLOCKED_FROM - 1), seq("long", 300)
    for s in (short, long_):
        tiers.place(s, s.length + 1)
    flash = ModelRunner(torch.nn.Identity(), tiers, torch.device("cpu"), flash=True)
    assert flash._placement(short, 0, short.length).masks == ()
    assert len(flash._placement(long_, 0, long_.length).masks) == 3
    plain = ModelRunner(torch.nn.Identity(), tiers, torch.device("cpu"))
    assert plain._placement(long_, 0, long_.length).masks == ()


@pytest.mark.parametrize("length", [BLOCKED_FROM, 700])
@torch.inference_mode()
def test_a_lone_long_sequence_decodes_the_batched_way_as_sdpa_would(length: int) -> None:
    q, k, v = qkv(length, seed=length + 1)
    kv = cache(1, length)
    kv.write_slot(0, 0, 0, k[0, :, : length - 1], v[0, :, : length - 1])  # the tokens before the new one
    position = torch.tensor([length - 1])
    group = DecodeGroup(kv, 0, 1, kv.rows_at(torch.tensor([0]), position), _decode_mask(position, kv.capacity),
                        length)
    new = (slice(None), slice(None), slice(length - 1, length))
    got = _decode_group(group, None, 0, q[new], k[new].transpose(1, 2), v[new].transpose(1, 2), DIM**-0.5)
    want = F.scaled_dot_product_attention(q[new], k, v, scale=DIM**-0.5, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.02)


def test_a_lone_sequence_decodes_by_sdpa_only_while_it_is_short() -> None:
    """SDPA's one-query decode reads keys at a seventh of the batched way's speed at 2,000 tokens: past
    ``BLOCKED_FROM``, a lone row gets a mask (the batched way) like several rows do."""
    tiers = KVTiers(num_layers=1, kv_heads=KV_HEADS, head_dim=DIM, max_length=1024, dtype=torch.bfloat16,
                    device=torch.device("cpu"))
    runner = ModelRunner(torch.nn.Identity(), tiers, torch.device("cpu"))
    short, long_ = seq("short", 10, output_len=BLOCKED_FROM - 11), seq("long", 10, output_len=BLOCKED_FROM - 10)
    tiers.place(short, short.length)
    [alone] = runner._groups([short], [short.length - 1])
    assert alone.mask is None and alone.kv_length == BLOCKED_FROM - 1
    tiers.remove(short)
    tiers.place(long_, long_.length)
    [alone] = runner._groups([long_], [long_.length - 1])
    assert alone.mask is not None and alone.kv_length == BLOCKED_FROM
