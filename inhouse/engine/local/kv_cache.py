"""One tier of the local engine's KV cache: slots of sequences up to one length, position p stored at index p.

Owns the per-layer key/value tensors, shaped ``[rows, kv_heads, capacity, head_dim]``, how they are written and
read, and how big they are.  The sequences of a tier occupy slots ``0..n-1`` with no gaps (``KVTiers`` moves
the last one into a hole), so a decode step reads the first n slots over the whole capacity, one contiguous
block, and masks the positions past each sequence's length: on CPU, bf16 batched matmuls are several times
faster on contiguous operands than on a strided ``[:n, :, :length]`` view.

Both dimensions follow need.  Capacity is a multiple of 128 tokens kept close to the tier's longest sequence
(32 tokens ahead, or a quarter of a shorter one; given back once two granules are spare) and never above the tier's
``bound``.  Close, because a decode step reads every row over the whole capacity and at long contexts that read
is the step's largest cost: four rows of 1,500 tokens took 11.9 ms of attention a step at a quarter ahead (1,920)
and 9.0 ms at 1,536.  Growing costs a copy of the tier every 128 decode steps (7 ms for those four rows); rows
grow in groups of ``row_group`` and are given back as soon as a whole group is free.  So the tensors hold at
most ``rows × bound`` tokens, and ``KVTiers`` counts on that.  Positions nobody wrote hold zeros or old keys,
never garbage, so masked reads stay finite.  The tensors are inference tensors (the runner writes them under
``torch.inference_mode``), so every method here may be called outside it.  Holds no masks and no model.
"""

from __future__ import annotations

import torch

__all__ = ["SlotKVCache"]

_GRANULE = 128
_AHEAD = 32  # tokens of room past a sequence's length (a quarter of it when shorter): decode steps before a copy


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class SlotKVCache:
    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        bound: int,
        dtype: torch.dtype,
        device: torch.device,
        row_group: int = 1,
    ) -> None:
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.bound = bound  # the longest sequence this tier holds
        self.row_group = row_group
        self.dtype = dtype
        self.device = device
        self.rows = 0
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    @property
    def allocated_bytes(self) -> int:
        return self.rows * self.capacity * self.bytes_per_token

    # ---- size ------------------------------------------------------------------------------

    def reserve(self, rows: int, length: int, empty: bool = False) -> None:
        """Hold at least ``rows`` slots of ``length`` tokens, keeping what is stored (``empty``: nothing stored is
        worth keeping, no slot holds a sequence yet: nothing is copied, which for a lone long prompt arriving in a
        tier sized for a shorter one was a copy of its spare row, 20-50 MB)."""
        if rows > self.rows or length > self.capacity:
            self._resize(max(self.rows, self.rows_for(rows)), max(self.capacity, self._capacity_for(length)), empty)

    def fit(self, rows: int, length: int) -> None:
        """Reserve ``rows`` × ``length``, and give back what is not needed (rows, capacity, or all when 0 rows).

        Only for a caller that knows no slot past ``rows`` and no position past ``length`` holds anything worth
        keeping (a decode step over every sequence of the tier): shrinking drops what lies beyond.
        """
        if rows == 0:
            self.clear()
            return
        want_rows = self.rows_for(rows) if rows > self.rows or self.rows - rows >= self.row_group else self.rows
        want_capacity = self._capacity_for(length)
        if length <= self.capacity < want_capacity + 2 * _GRANULE:
            want_capacity = self.capacity  # it fits, and less than two granules are spare: not worth a copy
        if (want_rows, want_capacity) != (self.rows, self.capacity):
            self._resize(want_rows, want_capacity)

    def clear(self) -> None:
        """Give every byte back (the tier holds no sequence)."""
        self.rows = self.capacity = 0
        self.keys, self.values = [], []

    def rows_for(self, rows: int) -> int:
        """The rows ``rows`` sequences take: rounded up to the row group."""
        return _round_up(rows, self.row_group)

    def _capacity_for(self, length: int) -> int:
        ahead = _round_up(max(length + min(length // 4, _AHEAD), _GRANULE), _GRANULE)
        return min(ahead, max(self.bound, length))

    @torch.inference_mode()
    def _resize(self, rows: int, capacity: int, empty: bool = False) -> None:
        keep_rows, keep = (0 if empty else min(self.rows, rows)), min(self.capacity, capacity)
        self.keys = self._moved(self.keys, rows, capacity, keep_rows, keep)
        self.values = self._moved(self.values, rows, capacity, keep_rows, keep)
        self.rows, self.capacity = rows, capacity

    def _moved(self, old: list[torch.Tensor], rows: int, capacity: int, keep_rows: int,
               keep: int) -> list[torch.Tensor]:
        """Each layer's new tensor: ``old``'s first ``keep_rows`` slots × ``keep`` positions copied (none when
        ``old`` is empty), zeros elsewhere; each byte is written once, the kept part not zeroed first."""
        if not old or not keep:
            keep_rows = 0
        layers = []
        for layer in range(self.num_layers):
            new = torch.empty((rows, self.kv_heads, capacity, self.head_dim), dtype=self.dtype, device=self.device)
            if keep_rows:
                new[:keep_rows, :, :keep].copy_(old[layer][:keep_rows, :, :keep])
                new[:keep_rows, :, keep:].zero_()
            new[keep_rows:].zero_()
            layers.append(new)
        return layers

    # ---- contents --------------------------------------------------------------------------

    @torch.inference_mode()
    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst``."""
        if src == dst or length == 0:
            return
        for layer in range(self.num_layers):
            self.keys[layer][dst, :, :length].copy_(self.keys[layer][src, :, :length])
            self.values[layer][dst, :, :length].copy_(self.values[layer][src, :, :length])

    @torch.inference_mode()
    def read(self, slot: int, start: int, length: int) -> torch.Tensor:
        """A copy of positions ``start..start+length`` of ``slot``, ``[layers, 2, kv_heads, length, head_dim]``.

        One ``stack`` of every layer's keys and values: the prefix cache reads a prompt block by block, and with a
        copy per layer and per block (60 for SmolLM2) a 3,000-token prompt's 47 blocks took 40-60 ms, against
        11-17 ms this way (in isolation)."""
        end = start + length
        parts = [part for keys, values in zip(self.keys, self.values, strict=True)
                 for part in (keys[slot, :, start:end], values[slot, :, start:end])]
        return torch.stack(parts).view(self.num_layers, 2, self.kv_heads, length, self.head_dim)

    @torch.inference_mode()
    def load(self, held: torch.Tensor, slot: int, start: int) -> None:
        """Put back what ``read`` returned (of this tier or another), at positions ``start..`` of ``slot``."""
        end = start + held.shape[3]
        for layer in range(self.num_layers):
            self.keys[layer][slot, :, start:end].copy_(held[layer, 0])
            self.values[layer][slot, :, start:end].copy_(held[layer, 1])

    def rows_at(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Where new tokens go: token t (in ``slots[t]`` at ``positions[t]``) × kv head, in that order.

        Indexes a layer viewed as ``[-1, head_dim]``; valid until the size changes.
        """
        heads = torch.arange(self.kv_heads, device=slots.device)
        first_row = (slots * self.kv_heads).view(-1, 1) + heads.view(1, -1)
        return (first_row * self.capacity + positions.view(-1, 1)).view(-1)

    def write(self, layer: int, rows: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store new keys and values, token-major (``[..., tokens, kv_heads, head_dim]``), at ``rows``."""
        flat = (-1, self.head_dim)
        self.keys[layer].view(flat).index_copy_(0, rows, key.reshape(flat))
        self.values[layer].view(flat).index_copy_(0, rows, value.reshape(flat))

    def write_slot(self, layer: int, slot: int, start: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store one sequence's new keys and values (``[kv_heads, tokens, head_dim]``) from position ``start``."""
        end = start + key.shape[1]
        self.keys[layer][slot, :, start:end].copy_(key)
        self.values[layer][slot, :, start:end].copy_(value)

    def window(self, layer: int, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first ``slots`` slots over the whole capacity, contiguous."""
        return self.keys[layer][:slots], self.values[layer][:slots]
