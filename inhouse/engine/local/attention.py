"""The attention function the local engine plugs into transformers models.

Owns reading and writing the KV cache's tiers during a forward pass.  transformers calls it in place
of SDPA in every attention layer (registered under ``ATTENTION_NAME``); the batch layout for the
step travels in the ``inhouse_batch`` keyword argument, which transformers passes down unchanged.
Works for any model whose attention layers use transformers' attention interface (Llama, Mistral,
Qwen2/3, Phi-3, ...); sliding-window attention is not applied.

Prefill runs causal SDPA over each sequence's own new tokens, and over the prefix already in its slot when
the prefix cache supplied one (a prefill from an offset).  A bf16 sequence of ``BLOCKED_FROM`` tokens or more
takes one of three ways, the fastest on the CPU (``prefers_flash`` tells the runner the first):

- on a CPU with AMX, PyTorch's flash attention, one call per block of ``FLASH_BLOCK`` queries (``_in_flash``):
  its matmuls run on the AMX tiles, 2-3x faster than the two ways below there (2,000 tokens: 8.6 ms a layer
  against 17.5 and 23.8);
- else the compiled kernel where the layout carries one (``attention_kernel.py``: CPUs with AVX512-BF16 and
  no AMX, 2-2.5x faster than ``_in_blocks`` at 1,000-3,000 tokens);
- else in blocks of 64 queries (``_in_blocks``: transformers' eager arithmetic, 1.6-1.9x faster than SDPA's
  flash kernel on a CPU without AMX).

Each gives a token the same result whether or not a cached prefix or earlier chunks came before it.

Decode (one query per sequence) runs, tier by tier, the compiled decode kernel where the layout carries one
(each row over its own positions only; ``attention_kernel.py``, 10-11% off a step of 8-32 rows), else two batched
matmuls against the tier's window with the query heads grouped per kv head, so grouped-query attention needs no
repeated keys, and a float32 softmax in between (transformers' eager attention does the same): on CPU this is 5-10
times faster than SDPA, whose kernel is built for many queries per sequence.  A lone sequence shorter than
``BLOCKED_FROM`` still decodes with SDPA over exactly its own tokens: that short, it costs no more, and a single
request's bf16 output stays bit for bit equal to ``model.generate``'s.  From ``BLOCKED_FROM`` tokens on, a lone
row takes the batched way too: SDPA's one-query decode reads keys at a seventh of the speed (0.84 against 0.11 ms
a layer at 2,000 tokens), which made a lone long chat's every token twice as slow.  A fused step packs both in one
row, the decode rows' tokens first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from transformers import AttentionInterface

from inhouse.engine.cpu import cpu_has
from inhouse.engine.local.attention_kernel import AttentionKernel, PackedPrompt
from inhouse.engine.local.kv_cache import SlotKVCache

__all__ = ["ATTENTION_NAME", "BLOCKED_FROM", "FLASH_BLOCK", "QUERY_BLOCK", "BatchLayout", "DecodeGroup", "Placement",
           "flash_masks", "prefers_flash", "register"]

ATTENTION_NAME = "inhouse_slots"
BLOCKED_FROM = 256  # a bf16 prefill this long (cached prefix included) runs the kernel or ``_in_blocks``
QUERY_BLOCK = 64  # queries per block there: the prefix cache's block, so a cached prefix ends on a block's edge
FLASH_BLOCK = 128  # queries per flash call (``_in_flash``); a slot's capacity is a multiple of it (kv_cache.py)


@dataclass(frozen=True, slots=True)
class Placement:
    """A prefill's sequence: ``length`` new tokens, packed from ``start`` in the pass's single row, to go to
    positions ``offset..`` of ``slot`` in ``cache`` (whose first ``offset`` positions it already holds)."""

    cache: SlotKVCache
    slot: int
    start: int
    length: int
    offset: int
    masks: tuple[torch.Tensor, ...] = ()  # the flash way's, one per block of queries (``flash_masks``); () if not
    kept: PackedPrompt | None = None  # the kernel's packed keys and values of the prompt, kept between its chunks


@dataclass(frozen=True, slots=True)
class DecodeGroup:
    """A decode step's rows ``start..end`` (one new token each): the sequences in slots ``0..end-start`` of
    ``cache``, in order.  Their keys and values go to ``cache_rows`` (``SlotKVCache.rows_at``); ``mask`` is
    additive float32 ``[rows, 1, 1, capacity]`` over the tier's window (None for a lone row shorter than
    ``BLOCKED_FROM``, which reads exactly its ``kv_length`` positions by SDPA)."""

    cache: SlotKVCache
    start: int
    end: int
    cache_rows: torch.Tensor
    mask: torch.Tensor | None
    kv_length: int
    lengths: torch.Tensor | None = None  # int32 [rows]: positions each row reads (the compiled decode's, on CPU)


@dataclass(frozen=True, slots=True)
class BatchLayout:
    """Where one forward pass reads and writes the cache: a decode's groups, a prefill's placements, or both in
    one packed row (the decode rows' tokens first, one each, then the prompts': a fused step)."""

    placements: tuple[Placement, ...] = ()
    groups: tuple[DecodeGroup, ...] = ()
    kernel: AttentionKernel | None = None  # the compiled attention, where it runs (attention_kernel.py)

    @property
    def is_prefill(self) -> bool:
        return bool(self.placements)


def slot_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``query`` ``[rows, heads, tokens, head_dim]`` → ``[rows, tokens, heads, head_dim]``."""
    layout: BatchLayout = kwargs["inhouse_batch"]
    layer: int = module.layer_idx  # type: ignore[assignment]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if not layout.is_prefill:
        return _decode_rows(layout, layer, query, key, value, scale), None
    out = query.new_empty((1, query.shape[2], query.shape[1], query.shape[3]))
    if layout.groups:  # a fused step: its first tokens are decode rows, one token each
        n = layout.groups[-1].end
        q, k, v = (t[0, :, :n].transpose(0, 1).unsqueeze(2) for t in (query, key, value))  # [n, heads, 1, dim]
        out[0, :n] = _decode_rows(layout, layer, q, k, v, scale)[:, 0]
    _prefill(layout, layer, query, key, value, scale, out)
    return out, None


def _decode_rows(layout: BatchLayout, layer: int, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor, scale: float) -> torch.Tensor:
    """Decode rows ``[rows, heads, 1, head_dim]``, tier by tier → ``[rows, 1, heads, head_dim]``."""
    groups = layout.groups
    if len(groups) == 1:
        return _decode_group(groups[0], layout.kernel, layer, query, key, value, scale)
    out = query.new_empty((query.shape[0], 1, query.shape[1], query.shape[3]))
    for group in groups:
        rows = slice(group.start, group.end)
        out[rows] = _decode_group(group, layout.kernel, layer, query[rows], key[rows], value[rows], scale)
    return out


def _decode_group(group: DecodeGroup, kernel: AttentionKernel | None, layer: int, query: torch.Tensor,
                  key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    group.cache.write(layer, group.cache_rows, key.transpose(1, 2), value.transpose(1, 2))
    keys, values = group.cache.window(layer, query.shape[0])
    if group.mask is None:
        return _decode_alone(query, keys[:, :, : group.kv_length], values[:, :, : group.kv_length], scale)
    if kernel is not None and group.lengths is not None and kernel.takes_decode(query, keys):
        out = query.new_empty((query.shape[0], 1, query.shape[1], query.shape[3]))
        kernel.decode(query, keys, values, group.lengths, scale, out)
        return out
    return _decode(group.mask, query, keys, values, scale)


def _prefill(layout: BatchLayout, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             scale: float, out: torch.Tensor) -> None:
    """Causal SDPA over each packed sequence of the single row (over its cached prefix too, when it has one),
    into ``out`` ``[1, tokens, heads, head_dim]``."""
    grouped = query.shape[1] != key.shape[1]
    for p in layout.placements:
        end = p.start + p.length
        p.cache.write_slot(layer, p.slot, p.offset, key[0, :, p.start : end], value[0, :, p.start : end])
        if p.masks:
            part = _in_flash(p, layer, query[:, :, p.start : end], scale, grouped)
        elif query.dtype == torch.bfloat16 and p.offset + p.length >= BLOCKED_FROM:
            keys, values = p.cache.keys[layer][p.slot], p.cache.values[layer][p.slot]
            if layout.kernel is not None and layout.kernel.takes(query[0], keys):
                layout.kernel.prefill(query[0, :, p.start : end], keys, values, p.offset, scale, out[0, p.start : end],
                                      p.kept.layer(layer) if p.kept is not None else None)
                continue
            part = _in_blocks(p, layer, query[:, :, p.start : end], scale)
        elif p.offset:
            part = _after_prefix(p, layer, query[:, :, p.start : end], scale, grouped)
        else:
            part = F.scaled_dot_product_attention(
                query[:, :, p.start : end], key[:, :, p.start : end], value[:, :, p.start : end],
                is_causal=True, scale=scale, enable_gqa=grouped,
            )
        out[:, p.start : end] = part.transpose(1, 2)


def flash_masks(offset: int, length: int, capacity: int, dtype: torch.dtype, device: torch.device,
                ) -> tuple[torch.Tensor, ...]:
    """The flash way's additive masks for new tokens at positions ``offset..offset + length`` of a slot of
    ``capacity`` positions: one per block of ``FLASH_BLOCK`` queries at fixed positions (0-127, 128-255, ...),
    ``[its new tokens, the block's end]``, position p seeing keys ``0..p``.  Built once a step, for every layer."""
    total, masks = offset + length, []
    for start in range(offset // FLASH_BLOCK * FLASH_BLOCK, total, FLASH_BLOCK):
        first, stop, end = max(start, offset), min(start + FLASH_BLOCK, total), min(start + FLASH_BLOCK, capacity)
        hidden = torch.arange(end, device=device).view(1, -1) > torch.arange(first, stop, device=device).view(-1, 1)
        masks.append(torch.zeros(hidden.shape, dtype=dtype, device=device).masked_fill_(hidden, float("-inf")))
    return tuple(masks)


def _in_flash(p: Placement, layer: int, query: torch.Tensor, scale: float, grouped: bool) -> torch.Tensor:
    """A long bf16 prefill's new tokens ``[1, heads, length, head_dim]`` over its slot by PyTorch's flash attention,
    one call per block of ``FLASH_BLOCK`` queries at fixed positions, each over the keys up to its block's end
    (positions past the prompt are masked: they hold zeros or old keys, never garbage).  A token's result then
    depends on its position alone: the kernel splits the keys at fixed points from position 0, and a block whose
    keys ended where its new tokens do (a chunk's last block) would split them differently and round otherwise.
    One causal call over a whole prompt is a fifth faster (7.0 against 8.6 ms a layer at 2,000 tokens) but rounds a
    token differently after a cached prefix or in a chunk; these bits keep those answers equal to a whole prefill's."""
    keys = p.cache.keys[layer][p.slot : p.slot + 1]
    values = p.cache.values[layer][p.slot : p.slot + 1]
    out = query.new_empty(query.shape)
    first = p.offset
    for mask in p.masks:
        rows, end = mask.shape
        block = slice(first - p.offset, first - p.offset + rows)
        out[:, :, block] = F.scaled_dot_product_attention(query[:, :, block], keys[:, :, :end], values[:, :, :end],
                                                          attn_mask=mask, scale=scale, enable_gqa=grouped)
        first += rows
    return out


def _after_prefix(p: Placement, layer: int, query: torch.Tensor, scale: float, grouped: bool) -> torch.Tensor:
    """A sequence's new tokens (positions ``offset..``) over its slot's keys and values, prefix and new ones
    alike (the new ones were written before this is called); new token t sees positions ``0..offset + t``.

    With more new tokens than cached ones (a long prompt after a short cached prefix), as one causal pass over
    the whole slot with the prefix's queries left empty: SDPA with a mask computes and masks the whole rectangle,
    1.4x slower here, while the causal pass wastes fewer queries than there are new ones, and is the very
    computation a prefill without the prefix cache runs, so the answers stay the same bit for bit.  A short part
    after a long prefix (a chunk, a new turn) is cheapest with the mask."""
    keys = p.cache.keys[layer][p.slot : p.slot + 1, :, : p.offset + p.length]
    values = p.cache.values[layer][p.slot : p.slot + 1, :, : p.offset + p.length]
    if p.offset <= p.length:
        padded = torch.cat([query.new_zeros((1, query.shape[1], p.offset, query.shape[3])), query], dim=2)
        out = F.scaled_dot_product_attention(padded, keys, values, is_causal=True, scale=scale, enable_gqa=grouped)
        return out[:, :, p.offset :]
    visible = torch.ones(p.length, p.offset + p.length, dtype=torch.bool, device=query.device).tril(diagonal=p.offset)
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=visible, scale=scale, enable_gqa=grouped)


def _in_blocks(p: Placement, layer: int, query: torch.Tensor, scale: float) -> torch.Tensor:
    """A long bf16 prefill's new tokens ``[1, heads, length, head_dim]`` over its slot, in blocks of
    ``QUERY_BLOCK`` queries at fixed positions (0-63, 64-127, ...): each block's scores against the keys up to
    its end are one bf16 matmul per kv head, scaled and causally masked in place, then a softmax computed in
    float32 and rounded once to bf16, and one batched matmul with the values: transformers' eager attention, block
    by block.  A power-of-two scale (head_dim 64's 1/8) multiplies the queries once instead of every block's
    scores: multiplying by a power of two rounds nothing, so the bits are the same, and a pass over the scores is
    saved.  With that and the batched values (which read the cache in place: 99 against 126 µs for three matmuls
    at a 192 × 1,000 block), a whole prefill took 418 / 1,002 / 1,833 ms at 1,000 / 2,000 / 3,000 tokens, against
    440 / 1,076 / 1,963 before, with the same logits.

    On this project's CPUs this is 1.6-1.9x faster than PyTorch's flash-attention kernel at 512-3,000 tokens
    (SmolLM2's shapes: 20 against 34 ms a layer at 2,000), whose float32 score tiles cost more than they save
    here.  The blocks sit at the same positions whatever the offset, so a prefill after a cached prefix (whose
    offset is a whole number of 64-token blocks) computes each of its tokens exactly as a whole prefill does."""
    total = p.offset + p.length
    keys = p.cache.keys[layer][p.slot, :, :total]  # [kv_heads, total, head_dim]
    values = p.cache.values[layer][p.slot, :, :total]
    kv_heads, _, dim = keys.shape
    group = query.shape[1] // kv_heads  # query head h reads kv head h // group
    exact = math.frexp(scale)[0] == 0.5  # a power of two (head_dim 64: 1/8) scales the queries without rounding
    q = (query[0] * scale if exact else query[0]).view(kv_heads, group, p.length, dim)
    out = query.new_empty((kv_heads, group, p.length, dim))
    hidden = torch.ones(QUERY_BLOCK, QUERY_BLOCK, dtype=torch.bool, device=query.device).triu(1)
    mask = torch.zeros(hidden.shape, dtype=query.dtype, device=query.device).masked_fill_(hidden, float("-inf"))
    for start in range(p.offset // QUERY_BLOCK * QUERY_BLOCK, total, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, total)
        first = max(start, p.offset)  # this block's first new token
        rows = stop - first
        block = q[:, :, first - p.offset : stop - p.offset].reshape(kv_heads, group * rows, dim)
        scores = block.new_empty((kv_heads, group * rows, stop))
        for head in range(kv_heads):  # one matmul per kv head reads its keys in place; a batched one copies them
            torch.mm(block[head], keys[head, :stop].t(), out=scores[head])
        scores.view(kv_heads, group, rows, stop)[..., first:stop].add_(
            mask[first - start : stop - start, first - start : stop - start])
        probs = torch.softmax(scores if exact else scores.mul_(scale), dim=-1)
        part = torch.bmm(probs, values[:, :stop])  # batched reads the values in place, and beats a matmul per head
        out[:, :, first - p.offset : stop - p.offset] = part.view(kv_heads, group, rows, dim)
    return out.view(1, kv_heads * group, p.length, dim)


def _decode_alone(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """A lone sequence: SDPA over exactly its cached tokens, bit for bit what transformers' sdpa does."""
    grouped = query.shape[1] != keys.shape[1]
    out = F.scaled_dot_product_attention(query, keys, values, scale=scale, enable_gqa=grouped)
    return out.transpose(1, 2)


def _decode(
    mask: torch.Tensor, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query per row against the row's cache window (``[rows, kv_heads, capacity, head_dim]``)."""
    rows, kv_heads, _, head_dim = keys.shape
    grouped = query.reshape(rows, kv_heads, -1, head_dim)  # query head h reads kv head h // group
    scores = torch.add(mask, torch.matmul(grouped, keys.transpose(2, 3)), alpha=scale)
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.matmul(probs, values).reshape(rows, 1, -1, head_dim)


def prefers_flash(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a long bf16 prompt's attention runs fastest by ``_in_flash`` here: on a CPU with AMX, whose tiles
    PyTorch's flash attention uses (the compiled kernel and ``_in_blocks`` do not)."""
    return device.type == "cpu" and dtype == torch.bfloat16 and cpu_has("amx_bf16") and _amx_enabled()


def _amx_enabled() -> bool:
    """The process may use the AMX tiles (Linux grants them on request; PyTorch asks)."""
    init = getattr(getattr(torch._C, "_cpu", None), "_init_amx", None)
    return bool(init()) if init is not None else False


def register() -> str:
    """Make ``ATTENTION_NAME`` known to transformers (idempotent) and return it."""
    AttentionInterface.register(ATTENTION_NAME, slot_attention)
    return ATTENTION_NAME
