"""The attention function the local engine plugs into transformers models.

Owns reading and writing the slot KV cache during a forward pass.  transformers calls it in place
of SDPA in every attention layer (registered under ``ATTENTION_NAME``); the batch layout for the
step travels in the ``inhouse_batch`` keyword argument, which transformers passes down unchanged.
Works for any model whose attention layers use transformers' attention interface (Llama, Mistral,
Qwen2/3, Phi-3, ...); sliding-window attention is not applied.

Prefill attends among the new tokens with SDPA.  Decode (one query per sequence) is two batched
matmuls against the cache window with the query heads grouped per kv head, so grouped-query attention
needs no repeated keys, and a float32 softmax in between (as transformers' eager attention does): on
CPU this is several times faster than SDPA, whose kernels are built for many queries per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from transformers import AttentionInterface

from inhouse.engine.local.kv_cache import SlotKVCache

__all__ = ["ATTENTION_NAME", "BatchLayout", "register"]

ATTENTION_NAME = "inhouse_slots"


@dataclass(frozen=True, slots=True)
class BatchLayout:
    """Where one forward pass reads and writes the cache.

    prefill: rows are new sequences, left-padded to a common length; row i goes to slot
    ``first_slot + i`` and its ``lengths[i]`` real tokens are the last ones of the row.  ``mask`` is
    boolean ``[rows, 1, padded, padded]``.
    decode: row i is the running sequence in slot i with one new token, stored at ``cache_rows``
    (from ``SlotKVCache.rows_at``).  ``mask`` is additive float32 ``[rows, 1, 1, capacity]``.
    """

    cache: SlotKVCache
    mask: torch.Tensor
    is_prefill: bool
    first_slot: int = 0
    lengths: tuple[int, ...] = ()
    cache_rows: torch.Tensor | None = None


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
    layout: BatchLayout = kwargs["inhouse_batch"]
    layer: int = module.layer_idx  # type: ignore[assignment]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if layout.is_prefill:
        return _prefill(layout, layer, query, key, value, scale), None
    return _decode(layout, layer, query, key, value, scale), None


def _prefill(
    layout: BatchLayout, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
) -> torch.Tensor:
    layout.cache.store_prompts(layer, layout.first_slot, layout.lengths, key, value)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=layout.mask, scale=scale, enable_gqa=query.shape[1] != key.shape[1]
    )
    return out.transpose(1, 2).contiguous()


def _decode(
    layout: BatchLayout, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
) -> torch.Tensor:
    """``query`` ``[n, heads, 1, head_dim]`` → ``[n, 1, heads, head_dim]``."""
    assert layout.cache_rows is not None
    layout.cache.append(layer, layout.cache_rows, key, value)
    keys, values = layout.cache.window(layer, query.shape[0])
    rows, kv_heads, _, head_dim = keys.shape
    grouped = query.reshape(rows, kv_heads, -1, head_dim)  # query head h reads kv head h // group
    scores = torch.add(layout.mask, torch.matmul(grouped, keys.transpose(2, 3)), alpha=scale)
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.matmul(probs, values).reshape(rows, 1, -1, head_dim)


def register() -> str:
    """Make ``ATTENTION_NAME`` known to transformers (idempotent) and return it."""
    AttentionInterface.register(ATTENTION_NAME, slot_attention)
    return ATTENTION_NAME
