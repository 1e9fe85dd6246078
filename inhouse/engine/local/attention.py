"""The attention function the local engine plugs into transformers models.

Owns reading and writing the slot KV cache during a forward pass.  transformers calls it in place
of SDPA in every attention layer (registered under ``ATTENTION_NAME``); the batch layout for the
step travels in the ``inhouse_batch`` keyword argument, which transformers passes down unchanged.
Works for any model whose attention layers use transformers' attention interface (Llama, Mistral,
Qwen2/3, Phi-3, ...); sliding-window attention is not applied.
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
    ``first_slot + i`` and its ``lengths[i]`` real tokens are the last ones of the row.
    decode: row i is the running sequence in slot i, with one new token at ``positions[i]``.
    """

    cache: SlotKVCache
    mask: torch.Tensor
    is_prefill: bool
    first_slot: int = 0
    lengths: tuple[int, ...] = ()
    positions: torch.Tensor | None = None
    kv_length: int = 0


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
    k_cache, v_cache = layout.cache.keys[layer], layout.cache.values[layer]
    rows = query.shape[0]
    if layout.is_prefill:
        padded = key.shape[2]
        for i, length in enumerate(layout.lengths):
            slot = layout.first_slot + i
            k_cache[slot, :, :length].copy_(key[i, :, padded - length :])
            v_cache[slot, :, :length].copy_(value[i, :, padded - length :])
        keys, values = key, value
    else:
        assert layout.positions is not None
        slots = torch.arange(rows, device=key.device)
        k_cache[slots, :, layout.positions] = key[:, :, 0]
        v_cache[slots, :, layout.positions] = value[:, :, 0]
        keys = k_cache[:rows, :, : layout.kv_length]
        values = v_cache[:rows, :, : layout.kv_length]
    out = F.scaled_dot_product_attention(
        query, keys, values, attn_mask=layout.mask, scale=scaling, enable_gqa=query.shape[1] != keys.shape[1]
    )
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Make ``ATTENTION_NAME`` known to transformers (idempotent) and return it."""
    AttentionInterface.register(ATTENTION_NAME, slot_attention)
    return ATTENTION_NAME
