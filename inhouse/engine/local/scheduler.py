"""Decides what the next engine step runs: a prefill of waiting sequences or a decode of running ones.

Owns the waiting queue, the running list and slot assignment (running[i] is in slot i, always).
Prefill goes first when there is room, bounded by a padded-token budget so one step stays short.  A sequence
given a slot gets its prompt's longest cached prefix copied in first (when there is a prefix cache), and its
prefill then runs only the rest.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from inhouse.engine.local.kv_cache import SlotKVCache
from inhouse.engine.local.prefix_cache import PrefixCache
from inhouse.engine.local.sequence import Sequence, SequenceStatus

__all__ = ["Scheduler", "Step"]


@dataclass(frozen=True, slots=True)
class Step:
    is_prefill: bool
    seqs: list[Sequence]
    first_slot: int = 0


class Scheduler:
    def __init__(self, cache: SlotKVCache, max_num_seqs: int, max_prefill_tokens: int,
                 prefix: PrefixCache | None = None) -> None:
        self.cache = cache
        self.prefix = prefix
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Step | None:
        if self.waiting and len(self.running) < self.max_num_seqs:
            return self._prefill()
        if self.running:
            return Step(is_prefill=False, seqs=list(self.running))
        return None

    def _prefill(self) -> Step:
        batch: list[Sequence] = []
        longest = 0
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            candidate = max(longest, len(self.waiting[0].prompt_ids))
            if batch and candidate * (len(batch) + 1) > self.max_prefill_tokens:
                break
            longest = candidate
            batch.append(self.waiting.popleft())
        first_slot = len(self.running)
        for offset, seq in enumerate(batch):
            seq.slot = first_slot + offset
            seq.status = SequenceStatus.RUNNING
            if self.prefix is not None:
                seq.cached = self.prefix.load(seq.prompt_ids, seq.adapter, seq.slot)
            self.running.append(seq)
        return Step(is_prefill=True, seqs=batch, first_slot=first_slot)

    def prefilled(self, seqs: list[Sequence]) -> None:
        """Their prompts are in their slots now: the prefix cache keeps the blocks it does not hold yet."""
        if self.prefix is not None:
            for seq in seqs:
                self.prefix.save(seq.prompt_ids, seq.adapter, seq.slot)

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out; the last running sequence moves into its slot."""
        seq.status = SequenceStatus.FINISHED
        if seq.slot < 0:
            if seq in self.waiting:
                self.waiting.remove(seq)
            return
        last = self.running.pop()
        if last is not seq:
            self.cache.move(last.slot, seq.slot, last.length)
            last.slot = seq.slot
            self.running[seq.slot] = last
        seq.slot = -1

    def find(self, request_id: str) -> Sequence | None:
        for seq in self.running:
            if seq.request_id == request_id:
                return seq
        for seq in self.waiting:
            if seq.request_id == request_id:
                return seq
        return None
