"""Runs the model for one scheduler step: a prefill of new sequences or a decode of running ones.

Owns building the tensors of a step (ids, positions, masks) and returning last-position logits.
Knows nothing about sampling, stopping or requests.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from inhouse.engine.local.attention import BatchLayout
from inhouse.engine.local.kv_cache import SlotKVCache
from inhouse.engine.local.sequence import Sequence

__all__ = ["ModelRunner"]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cache: SlotKVCache, device: torch.device) -> None:
        self.model = model
        self.cache = cache
        self.device = device

    @torch.inference_mode()
    def prefill(self, seqs: Seq[Sequence], first_slot: int) -> torch.Tensor:
        """Fill the cache for new sequences in slots ``first_slot..``; return their next-token logits."""
        lengths = [len(s.prompt_ids) for s in seqs]
        padded = max(lengths)
        self.cache.reserve(padded)
        ids = torch.zeros((len(seqs), padded), dtype=torch.long)
        positions = torch.zeros((len(seqs), padded), dtype=torch.long)
        for i, (seq, length) in enumerate(zip(seqs, lengths, strict=True)):
            ids[i, padded - length :] = torch.tensor(seq.prompt_ids, dtype=torch.long)
            positions[i, padded - length :] = torch.arange(length)
        starts = torch.tensor([padded - n for n in lengths]).view(-1, 1, 1, 1)
        index = torch.arange(padded)
        causal = index.view(1, 1, -1, 1) >= index.view(1, 1, 1, -1)
        real_key = index.view(1, 1, 1, -1) >= starts
        # padding rows attend to themselves only, so no row is fully masked (which would give NaN)
        mask = (causal & real_key) | torch.eye(padded, dtype=torch.bool).view(1, 1, padded, padded)
        layout = BatchLayout(
            cache=self.cache,
            mask=mask.to(self.device),
            is_prefill=True,
            first_slot=first_slot,
            lengths=tuple(lengths),
        )
        return self._forward(ids, positions, layout)

    @torch.inference_mode()
    def decode(self, seqs: Seq[Sequence]) -> torch.Tensor:
        """One token for each running sequence (sequence i in slot i); return next-token logits."""
        write_at = [s.length - 1 for s in seqs]
        self.cache.fit(max(write_at) + 1)
        positions = torch.tensor(write_at, dtype=torch.long)
        ids = torch.tensor([[s.last_token] for s in seqs], dtype=torch.long)
        layout = BatchLayout(
            cache=self.cache,
            mask=_decode_mask(positions, self.cache.capacity).to(self.device),
            is_prefill=False,
            cache_rows=self.cache.rows_at(positions).to(self.device),
        )
        return self._forward(ids, positions.view(-1, 1), layout)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
        out = self.model(
            input_ids=ids.to(self.device),
            position_ids=positions.to(self.device),
            use_cache=False,
            logits_to_keep=1,
            inhouse_batch=layout,
        )
        return out.logits[:, -1, :].float()


def _decode_mask(positions: torch.Tensor, capacity: int) -> torch.Tensor:
    """Additive float32 ``[n, 1, 1, capacity]``: row i sees cache positions ``0..positions[i]``."""
    hidden = torch.arange(capacity).view(1, 1, 1, -1) > positions.view(-1, 1, 1, 1)
    return torch.zeros(hidden.shape, dtype=torch.float32).masked_fill_(hidden, float("-inf"))
