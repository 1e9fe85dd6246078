"""The KV cache of the local engine: one slot per running sequence, position p stored at index p.

Owns the per-layer key/value tensors, shaped ``[slots, kv_heads, capacity, head_dim]``.  Running
sequences occupy slots ``0..n-1`` with no gaps, so a decode step reads a plain view of the first n
slots; when a sequence leaves, the last one moves into its slot.  Capacity (tokens per slot) grows
geometrically as sequences get longer and shrinks back when the engine is idle.
"""

from __future__ import annotations

import torch

__all__ = ["SlotKVCache"]

_MIN_CAPACITY = 256


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
        self.reserve(_MIN_CAPACITY)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    def _alloc(self, capacity: int) -> torch.Tensor:
        shape = (self.num_slots, self.kv_heads, capacity, self.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def reserve(self, length: int) -> None:
        """Make every slot hold at least ``length`` tokens, keeping what is stored."""
        if length <= self.capacity:
            return
        new_capacity = min(max(length, self.capacity * 2, _MIN_CAPACITY), max(self.max_length, length))
        keep = self.capacity
        new_keys, new_values = [], []
        for layer in range(self.num_layers):
            k, v = self._alloc(new_capacity), self._alloc(new_capacity)
            if keep:
                k[:, :, :keep].copy_(self.keys[layer])
                v[:, :, :keep].copy_(self.values[layer])
            new_keys.append(k)
            new_values.append(v)
        self.keys, self.values, self.capacity = new_keys, new_values, new_capacity

    def shrink(self) -> None:
        """Give memory back when nothing is running."""
        if self.capacity > _MIN_CAPACITY:
            self.capacity = 0
            self.keys, self.values = [], []
            self.reserve(_MIN_CAPACITY)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst``."""
        if src == dst or length == 0:
            return
        for layer in range(self.num_layers):
            self.keys[layer][dst, :, :length].copy_(self.keys[layer][src, :, :length])
            self.values[layer][dst, :, :length].copy_(self.values[layer][src, :, :length])
