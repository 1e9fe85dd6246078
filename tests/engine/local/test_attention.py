"""The attention of the local engine on random bf16 tensors: a long prompt's blocked prefill (``attention._prefill``)
against PyTorch's SDPA, a prefill after a cached prefix against a whole one, bit for bit, and a lone long
sequence's decode, which the runner sends the batched way (``_decode_group`` with a mask) rather than SDPA's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from inhouse.engine.local.attention import (
    BLOCKED_FROM,
    QUERY_BLOCK,
    BatchLayout,
    DecodeGroup,
    Placement,
    _decode_group,
    _prefill,
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
            scale: float = DIM**-0.5) -> torch.Tensor:
    """Attention of positions ``offset..`` of the prompt (its keys before ``offset`` already in the slot)."""
    new = (slice(None), slice(None), slice(offset, None))
    layout = BatchLayout(placements=(Placement(kv, slot, 0, q.shape[2] - offset, offset),))
    out = q.new_empty((1, q.shape[2] - offset, HEADS, DIM))
    _prefill(layout, 0, q[new], k[new], v[new], scale, out)
    return out.transpose(1, 2)


@pytest.mark.parametrize("scale", [DIM**-0.5, 0.1])  # a power of two scales the queries first; 0.1, the scores
@pytest.mark.parametrize("length", [BLOCKED_FROM, 300, 700])
def test_a_long_prompt_attends_as_sdpa_does(length: int, scale: float) -> None:
    q, k, v = qkv(length, seed=length)
    got = prefill(cache(1, length), 0, q, k, v, offset=0, scale=scale)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.02)  # bf16 scores, as transformers' eager attention


@pytest.mark.parametrize("cached", [QUERY_BLOCK, 3 * QUERY_BLOCK, 4 * QUERY_BLOCK])
def test_after_a_cached_prefix_each_token_is_computed_as_in_a_whole_prefill(cached: int) -> None:
    q, k, v = qkv(333, seed=cached)
    kv = cache(2, 333)
    whole = prefill(kv, 0, q, k, v, offset=0)
    kv.move(0, 1, cached)  # slot 1 holds the prefix, as the prefix cache leaves it
    rest = prefill(kv, 1, q, k, v, offset=cached)
    assert torch.equal(rest, whole[:, :, cached:])
    assert torch.equal(kv.keys[0][1, :, :333], kv.keys[0][0, :, :333])


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
