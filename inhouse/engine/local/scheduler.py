"""Decides what the next engine step runs: a prefill of waiting sequences or a decode of running ones.

Owns the waiting queue, the running list, and admission by memory: a sequence leaves the queue only while the
KV memory the running ones may come to hold, plus its own (``KVTiers.charge`` of its prompt plus its
``max_tokens``), plus the tiers' slack, fits the model's budget; otherwise it waits (first come, first served),
and nothing is ever cut short for room.  What the running sequences leave of the budget is the prefix cache's.
Prefill goes first when there is room, bounded by a token budget so one step stays short.  A sequence given a
slot gets its prompt's longest cached prefix copied in first (when there is a prefix cache), and its prefill then
runs only the rest.

Chunked prefill (``chunk_tokens`` > 0): a prompt with more than ``chunk_tokens`` tokens left to prefill is
prefilled alone, ``chunk_tokens`` at a time, and its chunks alternate with decode steps of the sequences already
running, so its arrival delays their next token by one chunk's time at most; a batch of shorter prompts stays
within ``chunk_tokens`` too.  One prompt at a time is chunked; it is the tiers' pinned sequence meanwhile.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from inhouse.engine.local.kv_tiers import KVTiers
from inhouse.engine.local.prefix_cache import PrefixCache
from inhouse.engine.local.sequence import Sequence, SequenceStatus

__all__ = ["Scheduler", "Step"]


@dataclass(frozen=True, slots=True)
class Step:
    is_prefill: bool
    seqs: list[Sequence]
    chunk: int = 0  # a chunk of a long prompt: prefill this many of its tokens (0: every token left)


class Scheduler:
    def __init__(self, tiers: KVTiers[Sequence], max_num_seqs: int, max_prefill_tokens: int, budget_tokens: int,
                 prefix: PrefixCache | None = None, chunk_tokens: int = 0) -> None:
        self.tiers = tiers
        self.prefix = prefix
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.budget_tokens = budget_tokens  # KV memory of the model, in tokens
        self.chunk_tokens = chunk_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.charged = 0  # tokens of memory the running sequences may come to hold
        self.chunking: Sequence | None = None  # the prompt being prefilled in chunks
        self._chunk_ran = False  # the last step was one of its chunks
        self._give_prefix_the_rest()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def charge(self, seq: Sequence) -> int:
        return self.tiers.charge(len(seq.prompt_ids) + seq.max_tokens)

    def fits(self, seq: Sequence) -> bool:
        """There is memory for ``seq`` next to the running sequences."""
        return self.charged + self.charge(seq) + self.tiers.slack <= self.budget_tokens

    def schedule(self) -> Step | None:
        if self.chunking is not None:
            return self._next_chunk(self.chunking)
        if self.waiting and len(self.running) < self.max_num_seqs and self.fits(self.waiting[0]):
            return self._prefill()
        if self.running:
            return Step(is_prefill=False, seqs=self.tiers.prepare_decode())
        return None

    def _next_chunk(self, seq: Sequence) -> Step:
        """The next chunk of the long prompt, or, right after one, a decode step of the others."""
        if self._chunk_ran and len(self.running) > 1:
            self._chunk_ran = False
            return Step(is_prefill=False, seqs=self.tiers.prepare_decode())
        self._chunk_ran = True
        chunk = min(self.chunk_tokens, len(seq.prompt_ids) - seq.cached)
        return Step(is_prefill=True, seqs=[seq], chunk=chunk)

    def _prefill(self) -> Step:
        batch: list[Sequence] = []
        longest = new_tokens = 0
        while self.waiting and len(self.running) < self.max_num_seqs and self.fits(self.waiting[0]):
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
            self._place(batch[-1])
        return Step(is_prefill=True, seqs=batch)

    def _start_chunks(self) -> Step:
        seq = self.waiting.popleft()
        self._place(seq)
        self.chunking = self.tiers.pinned = seq
        self._chunk_ran = False
        return self._next_chunk(seq)

    def _place(self, seq: Sequence) -> None:
        """Into a slot of the tier its prompt needs, with its cached prefix copied in; its charge counted."""
        seq.status = SequenceStatus.RUNNING
        seq.charge = self.charge(seq)
        self.charged += seq.charge
        self.running.append(seq)
        self._give_prefix_the_rest()
        tier = self.tiers.place(seq, min(len(seq.prompt_ids) + 1, self.tiers.max_length))
        if self.prefix is not None:
            seq.cached = self.prefix.load(seq.prompt_ids, seq.adapter, tier, seq.slot)
            seq.prefix_hit = seq.cached

    def _give_prefix_the_rest(self) -> None:
        """The prefix cache may hold what the running sequences' charges leave of the budget (it evicts down)."""
        if self.prefix is not None:
            room = self.budget_tokens - self.charged - self.tiers.slack
            self.prefix.limit(max(0, room) * self.tiers.bytes_per_token)

    def prefilled(self, step: Step, seqs: list[Sequence]) -> list[Sequence]:
        """``seqs`` of a prefill step ran; return those whose whole prompt is in their slot now (their next token
        is due), and let the prefix cache keep the blocks of those prompts it does not hold yet."""
        done = []
        for seq in seqs:
            seq.cached = seq.cached + step.chunk if step.chunk else len(seq.prompt_ids)
            if seq.cached < len(seq.prompt_ids):
                continue
            if seq is self.chunking:
                self.chunking = self.tiers.pinned = None
            if self.prefix is not None:
                self.prefix.save(seq.prompt_ids, seq.adapter, self.tiers.cache(seq), seq.slot)
            done.append(seq)
        return done

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out, wherever it is; its slot and its charge are freed."""
        seq.status = SequenceStatus.FINISHED
        if seq.tier < 0:
            if seq in self.waiting:
                self.waiting.remove(seq)
            return
        if seq is self.chunking:
            self.chunking = None
        self.tiers.remove(seq)
        self.running.remove(seq)
        self.charged -= seq.charge
        self._give_prefix_the_rest()

    def find(self, request_id: str) -> Sequence | None:
        for seq in self.running:
            if seq.request_id == request_id:
                return seq
        for seq in self.waiting:
            if seq.request_id == request_id:
                return seq
        return None
