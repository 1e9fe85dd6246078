"""Decides what the next engine step runs: a prefill of waiting sequences or a decode of running ones.

Owns the waiting queue, the running list and slot assignment (running[i] is in slot i, always).
Prefill goes first when there is room, bounded by a token budget (the prompts run packed back to back, with no
padding) so one step stays short.  A sequence given a slot gets its prompt's longest cached prefix copied in
first (when there is a prefix cache), and its prefill then runs only the rest.

Chunked prefill (``chunk_tokens`` > 0): a prompt with more than ``chunk_tokens`` tokens left to prefill is
prefilled alone, ``chunk_tokens`` at a time, and its chunks alternate with decode steps of the sequences already
running, so its arrival delays their next token by one chunk's time at most; a batch of shorter prompts stays
within ``chunk_tokens`` too.  One prompt at a time is chunked; it holds the last slot while it is, and decode
steps run the slots before it.
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
    chunk: int = 0  # a chunk of a long prompt: prefill this many of its tokens (0: every token left)
    hold: int = 0  # tokens a slot outside a decode step holds (a prompt half prefilled): the cache keeps them


class Scheduler:
    def __init__(self, cache: SlotKVCache, max_num_seqs: int, max_prefill_tokens: int,
                 prefix: PrefixCache | None = None, chunk_tokens: int = 0) -> None:
        self.cache = cache
        self.prefix = prefix
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.chunk_tokens = chunk_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.chunking: Sequence | None = None  # the prompt being prefilled in chunks (the last running, if any)
        self._chunk_ran = False  # the last step was one of its chunks

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Step | None:
        if self.chunking is not None:
            return self._next_chunk(self.chunking)
        if self.waiting and len(self.running) < self.max_num_seqs:
            return self._prefill()
        if self.running:
            return Step(is_prefill=False, seqs=list(self.running))
        return None

    def _next_chunk(self, seq: Sequence) -> Step:
        """The next chunk of the long prompt, or, right after one, a decode step of the others."""
        decoding = self.running[:-1]
        if self._chunk_ran and decoding:
            self._chunk_ran = False
            return Step(is_prefill=False, seqs=decoding, hold=seq.cached)
        self._chunk_ran = True
        chunk = min(self.chunk_tokens, len(seq.prompt_ids) - seq.cached)
        return Step(is_prefill=True, seqs=[seq], first_slot=seq.slot, chunk=chunk)

    def _prefill(self) -> Step:
        batch: list[Sequence] = []
        longest = new_tokens = 0
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            head = self.waiting[0]
            candidate = max(longest, len(head.prompt_ids))
            if batch and candidate * (len(batch) + 1) > self.max_prefill_tokens:
                break
            if self.chunk_tokens:
                new = len(head.prompt_ids) - (self.prefix.match(head.prompt_ids, head.adapter) if self.prefix else 0)
                if new > self.chunk_tokens and not batch:
                    return self._start_chunks()
                if new > self.chunk_tokens or new_tokens + new > self.chunk_tokens:
                    break
                new_tokens += new
            longest = candidate
            batch.append(self.waiting.popleft())
        first_slot = len(self.running)
        for seq in batch:
            self._place(seq)
        return Step(is_prefill=True, seqs=batch, first_slot=first_slot)

    def _start_chunks(self) -> Step:
        seq = self.waiting.popleft()
        self._place(seq)
        self.chunking = seq
        self._chunk_ran = False
        return self._next_chunk(seq)

    def _place(self, seq: Sequence) -> None:
        """Into the next free slot, with its cached prefix copied in."""
        seq.slot = len(self.running)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        if self.prefix is not None:
            seq.cached = self.prefix.load(seq.prompt_ids, seq.adapter, seq.slot)
            seq.prefix_hit = seq.cached

    def prefilled(self, step: Step, seqs: list[Sequence]) -> list[Sequence]:
        """``seqs`` of a prefill step ran; return those whose whole prompt is in their slot now (their next token
        is due), and let the prefix cache keep the blocks of those prompts it does not hold yet."""
        done = []
        for seq in seqs:
            seq.cached = seq.cached + step.chunk if step.chunk else len(seq.prompt_ids)
            if seq.cached < len(seq.prompt_ids):
                continue
            if seq is self.chunking:
                self.chunking = None
            if self.prefix is not None:
                self.prefix.save(seq.prompt_ids, seq.adapter, seq.slot)
            done.append(seq)
        return done

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out; the last running sequence moves into its slot (the last decoding one, when a
        prompt is being chunked: that prompt then moves down one slot, so it stays last)."""
        seq.status = SequenceStatus.FINISHED
        if seq.slot < 0:
            if seq in self.waiting:
                self.waiting.remove(seq)
            return
        chunked = self.running.pop() if self.chunking is not None else None
        if chunked is seq:
            self.chunking = None
            seq.slot = -1
            return
        last = self.running.pop()
        if last is not seq:
            self.cache.move(last.slot, seq.slot, last.length)
            last.slot = seq.slot
            self.running[seq.slot] = last
        if chunked is not None:
            self.cache.move(chunked.slot, len(self.running), chunked.cached)
            chunked.slot = len(self.running)
            self.running.append(chunked)
        seq.slot = -1

    def find(self, request_id: str) -> Sequence | None:
        for seq in self.running:
            if seq.request_id == request_id:
                return seq
        for seq in self.waiting:
            if seq.request_id == request_id:
                return seq
        return None
