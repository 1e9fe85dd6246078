"""Where each running sequence's keys and values live: the local engine's KV cache as tiers by length.

Owns the tiers (one ``SlotKVCache`` each, for sequences up to 256, 512, 1024, ... tokens, the last one up to
the context length), which sequence is in which tier and slot, moving a sequence up a tier when it outgrows its
own, and what the tiers may cost.  A decode step reads each tier's slots over that tier's capacity, so a short
sequence never scans a long one's positions and memory follows the tokens held: a 3,000-token prompt makes its
own tier 4,096 tokens deep, not every slot of the engine.

What a sequence may cost is known when it is admitted: it ends at most ``prompt + max_tokens`` tokens long, so
in that length's tier at the deepest, and a tier never holds more than ``rows × bound`` tokens, where rows are
its sequences rounded up to the tier's row group (the small tiers grow a few rows at a time, so that a short
chat's arrival is not a copy of the whole tier).  ``charge(length)`` is that bound; ``slack`` is what the row
groups may add.  The scheduler admits a sequence while the charges of the running ones, plus its own, plus the
slack fit the memory budget; so the tiers never exceed it, except for one sequence's old slot while it moves up.

A tier may keep one row group more than its sequences need (a **spare**), so that the next arrival takes a free
row instead of a copy of the whole tier: with one or two long prompts in a tier, each arrival and each departure
copied it (100-140 ms for two rows of 3,000 tokens on a busy server).  Spares are memory no sequence is charged
for, so the scheduler says how much may be kept (``keep_spare``: what the budget has left once the running
sequences' charges, the slack and the prefix cache's whole budget are counted), and the tiers give back spares past
that at once.

In a tier, sequences occupy slots ``0..n-1``; when one leaves, the last moves into its hole.  The ``pinned``
sequences (prompts being prefilled in chunks, which decode nothing yet) are always the last of their tier, so a
decode step runs each tier's first slots.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import torch

from inhouse.engine.local.kv_cache import SlotKVCache

if TYPE_CHECKING:
    from inhouse.engine.local.loader import LoadedModel

__all__ = ["KVTiers", "Placed"]

_SMALLEST = 256  # the first tier's bound; each next one is twice as deep
_GROUP_TOKENS = 2048  # a tier grows by this many tokens' worth of rows at a time (at least one row)


class Placed(Protocol):
    """What the tiers read and set of a sequence (``Sequence`` in the engine)."""

    tier: int
    slot: int

    @property
    def prompt_ids(self) -> list[int]: ...

    @property
    def length(self) -> int: ...

    @property
    def cached(self) -> int: ...


P = TypeVar("P", bound=Placed)


class KVTiers(Generic[P]):
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, max_length: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.max_length = max_length
        self.bounds: list[int] = []
        bound = _SMALLEST
        while bound < max_length:
            self.bounds.append(bound)
            bound *= 2
        self.bounds.append(max_length)
        self.tiers = [SlotKVCache(num_layers, kv_heads, head_dim, b, dtype, device, max(1, _GROUP_TOKENS // b))
                      for b in self.bounds]
        self.members: list[list[P]] = [[] for _ in self.bounds]
        self.pinned: list[P] = []  # prompts being prefilled in chunks (``pin``): the last slots of their tiers
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.slack = sum((t.row_group - 1) * t.bound for t in self.tiers)  # tokens the row groups may add
        self.spare_room = 0  # tokens the tiers may hold in spare rows (``keep_spare``)

    @classmethod
    def for_model(cls, loaded: LoadedModel) -> KVTiers[P]:
        """The tiers for a loaded decoder: its layers, kv heads and head size, its context, dtype and device."""
        config = loaded.model.config
        return cls(
            num_layers=config.num_hidden_layers,
            kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            max_length=loaded.context_length,
            dtype=loaded.dtype,
            device=loaded.device,
        )

    @property
    def bytes_per_token(self) -> int:
        return self.tiers[0].bytes_per_token

    @property
    def allocated_bytes(self) -> int:
        return sum(t.allocated_bytes for t in self.tiers)

    @property
    def spare_tokens(self) -> int:
        """Tokens held in rows past what the tiers' sequences need (their row groups rounded up)."""
        return sum(self._spare_rows(k) * t.capacity for k, t in enumerate(self.tiers))

    def keep_spare(self, room: int) -> None:
        """From now on keep at most ``room`` tokens in spare rows; give back those past it now."""
        self.spare_room = room
        self._trim_spares()

    def _spare_rows(self, k: int) -> int:
        tier = self.tiers[k]
        return tier.rows - tier.rows_for(len(self.members[k])) if tier.rows else 0

    def _trim_spares(self) -> None:
        """Give back spare rows, the biggest first, until they fit ``spare_room``."""
        while self.spare_tokens > self.spare_room:
            k = max(range(len(self.tiers)), key=lambda i: self._spare_rows(i) * self.tiers[i].capacity)
            self.tiers[k].fit(len(self.members[k]), self.tiers[k].capacity)

    def tier_for(self, length: int) -> int:
        for k, bound in enumerate(self.bounds):
            if length <= bound:
                return k
        raise ValueError(f"{length} tokens is longer than the context ({self.max_length})")

    def charge(self, length: int) -> int:
        """The tokens of memory a sequence that ends at most ``length`` tokens long may hold."""
        return self.bounds[self.tier_for(min(length, self.max_length))]

    def cache(self, seq: P) -> SlotKVCache:
        return self.tiers[seq.tier]

    # ---- placing -----------------------------------------------------------------------------

    def place(self, seq: P, length: int) -> SlotKVCache:
        """Give ``seq`` a slot in the tier for ``length`` tokens (room for them reserved); return the tier."""
        k = self.tier_for(length)
        self._append(seq, k)
        tier = self.tiers[k]
        tier.reserve(len(self.members[k]), length, empty=len(self.members[k]) == 1)  # seq alone: nothing to keep
        return tier

    def pin(self, seq: P) -> None:
        """Keep ``seq``, just placed (before its tier's pinned ones), out of decode steps while its prompt is
        prefilled in chunks, among the last slots of its tier, until ``unpin``."""
        assert seq.slot == len(self.members[seq.tier]) - 1 - self._pinned_count(seq.tier), "placed before them"
        self.pinned.append(seq)

    def unpin(self, seq: P) -> None:
        """``seq``'s prompt is whole: it decodes from the next step on, from the first of its tier's pinned slots
        (trading slots, keys and values with the pinned one there, if that is another)."""
        if not self._is_pinned(seq):
            return
        members, tier = self.members[seq.tier], self.tiers[seq.tier]
        first = members[len(members) - self._pinned_count(seq.tier)]
        self.pinned = [s for s in self.pinned if s is not seq]
        if first is not seq:
            held = tier.read(seq.slot, 0, seq.cached)
            tier.move(first.slot, seq.slot, first.cached)
            tier.load(held, first.slot, 0)
            seq.slot, first.slot = first.slot, seq.slot
            members[seq.slot], members[first.slot] = seq, first

    def _is_pinned(self, seq: P) -> bool:
        return any(s is seq for s in self.pinned)

    def _pinned_count(self, k: int) -> int:
        return sum(s.tier == k for s in self.pinned)

    def remove(self, seq: P) -> None:
        """Take ``seq`` out of its tier: the tier's last decoding sequence moves into its slot, and the last pinned
        one into that one's (a pinned ``seq``'s: the last pinned one).  One free row group stays as the tier's
        spare while ``spare_room`` allows; more are given back."""
        if seq.tier < 0:
            return
        k, members, tier = seq.tier, self.members[seq.tier], self.tiers[seq.tier]
        pinned = self._pinned_count(k)
        hole = seq.slot
        if self._is_pinned(seq):
            self.pinned = [s for s in self.pinned if s is not seq]
        else:
            self._fill(k, hole, len(members) - pinned - 1)
            hole = len(members) - pinned - 1
        self._fill(k, hole, len(members) - 1)
        members.pop()
        seq.tier = seq.slot = -1
        if self._spare_rows(k) > tier.row_group:  # one group is kept, room permitting
            tier.fit(len(members) + tier.row_group, tier.capacity)
        self._trim_spares()

    def _fill(self, k: int, hole: int, src: int) -> None:
        """Move tier ``k``'s sequence at slot ``src`` into slot ``hole`` (which is leaving), with what it holds."""
        if src == hole:
            return
        members = self.members[k]
        moved = members[src]
        self.tiers[k].move(src, hole, moved.cached if self._is_pinned(moved) else moved.length)
        moved.slot = hole
        members[hole] = moved

    def _append(self, seq: P, k: int) -> None:
        """Into the next free slot of tier k, before its pinned sequences (the first of them moves to the end)."""
        members, tier = self.members[k], self.tiers[k]
        pinned = self._pinned_count(k)
        seq.tier = k
        members.append(seq)
        seq.slot = len(members) - 1
        if pinned:
            first = members[len(members) - 1 - pinned]
            tier.reserve(len(members), first.cached)
            tier.move(first.slot, seq.slot, first.cached)
            first.slot, seq.slot = seq.slot, first.slot
            members[first.slot], members[seq.slot] = first, seq

    # ---- a decode step -----------------------------------------------------------------------

    def prepare_decode(self) -> list[P]:
        """Move up a tier every sequence whose next token would not fit its own, size every tier for the step,
        and return the sequences it runs, in its order: tier by tier, slot by slot (the pinned ones left out)."""
        for members, bound in zip(self.members, self.bounds, strict=True):
            for seq in [s for s in members if not self._is_pinned(s) and s.length > bound]:
                self._move_up(seq)
        rows: list[P] = []
        for k, (members, tier) in enumerate(zip(self.members, self.tiers, strict=True)):
            if members:
                keep = len(members) + min(self._spare_rows(k), tier.row_group)  # its spare, if it has one
                tier.fit(keep, max(len(s.prompt_ids) if self._is_pinned(s) else s.length for s in members))
                rows.extend(s for s in members if not self._is_pinned(s))
        self._trim_spares()  # a tier that grew its capacity grew its spare too
        return rows

    def _move_up(self, seq: P) -> None:
        """Into the tier its length needs, with the keys and values it holds (all its tokens but the last)."""
        held = self.cache(seq).read(seq.slot, 0, seq.length - 1)
        self.remove(seq)
        self.place(seq, seq.length).load(held, seq.slot, 0)

    def shrink(self) -> None:
        """Give back every tier no sequence is in (the engine is idle, or nearly)."""
        for members, tier in zip(self.members, self.tiers, strict=True):
            if not members:
                tier.clear()
