"""The KV cache of the local engine: one slot per running sequence, position p stored at index p.

Owns the per-layer key/value tensors, shaped ``[slots, kv_heads, capacity, head_dim]``, how they are
written and read, and how big they are.  Running sequences occupy slots ``0..n-1`` with no gaps; when
a sequence leaves, the last one moves into its slot.

A decode step reads the first n slots over the *whole* capacity, which is one contiguous block, and
masks the positions past each sequence's length: on CPU, bf16 batched matmuls are several times faster
on contiguous operands than on a strided ``[:n, :, :length]`` view.  So capacity is kept close to the
longest running sequence: a multiple of 128 tokens, grown a quarter ahead of need, given back during
decode when less than half of it is used and entirely when the engine is idle.  Positions nobody wrote
hold zeros or old keys, never garbage, so masked reads stay finite.  The tensors are inference tensors
(the runner writes them under ``torch.inference_mode``), so every method here may be called outside it.
Holds no masks and no model.
"""

from __future__ import annotations

import torch

__all__ = ["SlotKVCache"]

_GRANULE = 128
_MIN_CAPACITY = _GRANULE


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class SlotKVCache:
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        kv_heads: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_layers = num_layers
        self.num_slots = num_slots
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.max_length = max_length
        self.dtype = dtype
        self.device = device
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._resize(_MIN_CAPACITY)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    # ---- size ------------------------------------------------------------------------------

    def reserve(self, length: int) -> None:
        """Make every slot hold at least ``length`` tokens, keeping what is stored."""
        if length > self.capacity:
            self._resize(self._capacity_for(length))

    def fit(self, length: int) -> None:
        """Reserve ``length`` tokens, and give memory back when less than half of it is in use.

        Only for a caller that knows no slot holds more than ``length`` tokens worth keeping (a decode
        step over every running sequence): shrinking drops what lies beyond.
        """
        if self.capacity > max(2 * length, _MIN_CAPACITY) + _GRANULE:
            self._resize(self._capacity_for(length))
        else:
            self.reserve(length)

    def shrink(self) -> None:
        """Give memory back when nothing is running."""
        if self.capacity > _MIN_CAPACITY:
            self.capacity = 0
            self.keys, self.values = [], []
            self._resize(_MIN_CAPACITY)

    def _capacity_for(self, length: int) -> int:
        ahead = _round_up(max(length + length // 4, _MIN_CAPACITY), _GRANULE)
        return min(ahead, max(self.max_length, length))

    def _alloc(self, capacity: int) -> torch.Tensor:
        shape = (self.num_slots, self.kv_heads, capacity, self.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def _resize(self, capacity: int) -> None:
        keep = min(self.capacity, capacity)
        new_keys, new_values = [], []
        for layer in range(self.num_layers):
            k, v = self._alloc(capacity), self._alloc(capacity)
            if keep:
                k[:, :, :keep].copy_(self.keys[layer][:, :, :keep])
                v[:, :, :keep].copy_(self.values[layer][:, :, :keep])
            new_keys.append(k)
            new_values.append(v)
        self.keys, self.values, self.capacity = new_keys, new_values, capacity

    # ---- contents --------------------------------------------------------------------------

    @torch.inference_mode()
    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst``."""
        if src == dst or length == 0:
            return
        for layer in range(self.num_layers):
            self.keys[layer][dst, :, :length].copy_(self.keys[layer][src, :, :length])
            self.values[layer][dst, :, :length].copy_(self.values[layer][src, :, :length])

    def rows_at(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Where new tokens go: token t (in ``slots[t]`` at ``positions[t]``) × kv head, in that order.

        Indexes a layer viewed as ``[-1, head_dim]``; valid until the capacity changes.
        """
        heads = torch.arange(self.kv_heads, device=slots.device)
        first_row = (slots * self.kv_heads).view(-1, 1) + heads.view(1, -1)
        return (first_row * self.capacity + positions.view(-1, 1)).view(-1)

    def write(self, layer: int, rows: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store new keys and values, token-major (``[..., tokens, kv_heads, head_dim]``), at ``rows``."""
        flat = (-1, self.head_dim)
        self.keys[layer].view(flat).index_copy_(0, rows, key.reshape(flat))
        self.values[layer].view(flat).index_copy_(0, rows, value.reshape(flat))

    def window(self, layer: int, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first ``slots`` slots over the whole capacity, contiguous."""
        return self.keys[layer][:slots], self.values[layer][:slots]
