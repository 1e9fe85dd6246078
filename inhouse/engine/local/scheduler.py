"""Decides what the next engine step runs: a token for every running sequence, and prompt tokens beside them.

Owns the waiting queue, the running list, and admission by memory: a sequence leaves the queue only while the
KV memory the running ones may come to hold, plus its own (``KVTiers.charge`` of its prompt plus its
``max_tokens``), plus the tiers' slack, fits the model's budget; otherwise it waits (first come, first served),
and nothing is ever cut short for room.  What the running sequences leave of the budget is the prefix cache's,
and what that leaves may hold the tiers' spare rows (``KVTiers.keep_spare``).
A sequence given a slot gets its prompt's longest cached prefix copied in first (when there is a prefix cache),
and its prefill then runs only the rest.

Every step decodes every running sequence, and takes prompt tokens into the same forward pass (one read of the
weights for both).  When nothing is decoding, a step takes up to ``max_prefill_tokens`` prompt tokens, but a prompt
being chunked goes on ``chunk_tokens`` at a time.  While sequences decode, with chunked prefill on (``chunk_tokens``
> 0), a step takes only the prompt tokens ``Pace`` allows (at most ``chunk_tokens``), and a prompt that does not fit
what is left of them is prefilled in chunks over the next steps: its arrival slows the running streams' next token
by a fraction of a step rather than stalling them for its whole prefill.  Short prompts too: a chat's 40-60 tokens
taken whole beside six streams made that step 3x a decode step's time (73 ms against 22 on a CPU without AMX, at
SmolLM2's size), and such steps, one per arrival, set the streams' inter-token p99.  But a short prompt with others
waiting behind it (a burst) goes in whole, the first of a step: cut, it only kept them waiting longer (the engine
benchmark's 32 users starting together: TTFT p99 5.2 s, 2.7 s whole).

A step takes prompt tokens in this order: short prompts being chunked (``SHORT`` tokens or fewer to go), the
waiting prompts (first come, first served), then the long prompt being chunked.  One long prompt is chunked at a
time (a longer one that does not fit waits for it); short ones are chunked beside it, as many as the steps take
(each pinned among the last slots of its KV tier, ``KVTiers.pin``, while it decodes nothing).  So a chat that
arrives while a 3,000-token prompt is prefilled goes ahead of its chunks: the chunk shrinks, or skips a step the
chat fills; and a burst of chats fills every step's budget to the token, the last of them cut.

A chunk of a prompt with more than a few chunks left ends on a block of the attention's queries
(``QUERY_BLOCK``, 64 tokens) when it is two blocks long or more, and on a multiple of ``ALIGN`` (16) when
shorter.  Attention reads the keys up to a block's end once for all of the block's new queries, so a chunk that
ends inside a block makes the next one read that block's keys again: a 16-token chunk at offset 3,000
(straddling a block's edge) took 17.6 ms of attention over 30 layers, one at 3,008 took 13.1.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from inhouse.engine.local.attention import QUERY_BLOCK
from inhouse.engine.local.kv_tiers import KVTiers
from inhouse.engine.local.pace import Pace
from inhouse.engine.local.prefix_cache import PrefixCache
from inhouse.engine.local.sequence import Sequence, SequenceStatus

__all__ = ["ALIGN", "SHORT", "Scheduler", "Step"]

SHORT = 64  # a prompt with this many tokens to go or fewer goes ahead of a long one's chunks, and beside them
ALIGN = 16  # a chunk shorter than a query block ends on a multiple of this (a divisor of QUERY_BLOCK)
_UNCUT = 4  # a prompt's last chunks, as many as this, are not cut to a block


@dataclass(frozen=True, slots=True)
class Step:
    """One forward pass: a token for each of ``decode``, and the next ``chunks[i]`` tokens of ``prefill[i]``'s prompt
    (its whole rest, or a chunk of it); ``pairs``: the query-key pairs their attention reads (``Pace``)."""

    decode: list[Sequence]
    prefill: list[Sequence]
    chunks: list[int]
    pairs: float = 0.0

    @property
    def seqs(self) -> list[Sequence]:
        return [*self.decode, *self.prefill]

    @property
    def prompt_tokens(self) -> int:
        return sum(self.chunks)

    def chunk_of(self, seq: Sequence) -> int:
        """The tokens of ``seq``'s prompt this step runs."""
        return next(chunk for s, chunk in zip(self.prefill, self.chunks, strict=True) if s is seq)


class _Fill:
    """The step being filled: its decode rows, and the prompt tokens taken beside them so far."""

    def __init__(self, decode: list[Sequence]) -> None:
        self.decode = decode
        self.prefill: list[Sequence] = []
        self.chunks: list[int] = []
        self.pairs = 0.0

    @property
    def tokens(self) -> int:
        return sum(self.chunks)

    def take(self, seq: Sequence, chunk: int) -> None:
        self.prefill.append(seq)
        self.chunks.append(chunk)
        self.pairs += _pairs(seq, chunk)

    def step(self) -> Step:
        return Step(self.decode, self.prefill, self.chunks, self.pairs)


class Scheduler:
    def __init__(self, tiers: KVTiers[Sequence], max_num_seqs: int, max_prefill_tokens: int, budget_tokens: int,
                 prefix: PrefixCache | None = None, chunk_tokens: int = 0) -> None:
        self.tiers = tiers
        self.prefix = prefix
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens  # prompt tokens of a step when nothing decodes
        self.budget_tokens = budget_tokens  # KV memory of the model, in tokens
        self.chunk_tokens = chunk_tokens
        self.pace = Pace(chunk_tokens) if chunk_tokens else None
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.charged = 0  # tokens of memory the running sequences may come to hold
        self.chunking: list[Sequence] = []  # prompts being prefilled in chunks (pinned in their tiers)
        self.unsaved: list[Sequence] = []  # prompts whole this step, for the prefix cache after the hand-off
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
        """The running sequences' next tokens, and as many prompt tokens beside them as the step may take: short
        prompts being chunked first, then waiting ones, then the long one being chunked."""
        fill = _Fill(self.tiers.prepare_decode() if self.running else [])
        going = sorted(self.chunking, key=_rest)
        for seq in going:
            if _rest(seq) <= SHORT:
                self._go_on(fill, seq)
        self._admit(fill)
        for seq in going:
            if _rest(seq) > SHORT:
                self._go_on(fill, seq)
        if not fill.decode and not fill.prefill:
            return None
        return fill.step()

    def _room(self, fill: _Fill, offset: int, chunk: bool) -> int:
        """Prompt tokens ``fill`` may still take of a prompt whose first ``offset`` tokens are in the cache: while
        sequences decode, what the pace allows (chunking on: its ``budget`` for a ``chunk``, or for a whole prompt
        the first in the step; for a later whole one, the ``room`` left, however little); otherwise up to
        ``max_prefill_tokens`` in all, or, for a ``chunk``, ``chunk_tokens``."""
        if fill.decode and self.pace is not None:
            ask = self.pace.budget if chunk or not fill.tokens else self.pace.room
            return ask(len(fill.decode), offset, fill.tokens, fill.pairs, len(self.waiting) + len(self.chunking))
        most = min(self.chunk_tokens, self.max_prefill_tokens) if chunk else self.max_prefill_tokens
        return max(0, most - fill.tokens)

    def _go_on(self, fill: _Fill, seq: Sequence) -> None:
        """The next chunk of ``seq``'s prompt, as much as ``fill`` has room for (none: it waits a step)."""
        room = self._room(fill, seq.cached, chunk=True)
        if room > 0:
            fill.take(seq, _aligned(seq.cached, min(room, _rest(seq)), len(seq.prompt_ids)))

    def _admit(self, fill: _Fill) -> None:
        """Waiting prompts that fit in slots, memory and ``fill``'s room, placed and taken whole, first come first
        served (the step's first, if short with others behind it, whatever the room); then the next one, if it does
        not fit whole, placed and chunked (chunking on) when it may be: a short one, or a long one while no other
        is.  With chunking off, a prompt longer than the room runs alone beside the decode rows."""
        while self.waiting and len(self.running) < self.max_num_seqs and self.fits(self.waiting[0]):
            head = self.waiting[0]
            offset = self.prefix.match(head.prompt_ids, head.adapter) if self.prefix else 0
            new = len(head.prompt_ids) - offset
            queued = new <= SHORT and not fill.prefill and len(self.waiting) > 1  # a short one with others behind
            if new > self._room(fill, offset, chunk=False) and not queued:
                if self.chunk_tokens and self._may_chunk(new, self._room(fill, offset, chunk=True)):
                    self._place(self.waiting.popleft())
                    self.chunking.append(head)
                    self.tiers.pin(head)
                    self._go_on(fill, head)
                elif not self.chunk_tokens and not fill.prefill:
                    self._place(self.waiting.popleft())
                    fill.take(head, _rest(head))
                return
            self._place(self.waiting.popleft())
            fill.take(head, _rest(head))

    def _may_chunk(self, new: int, room: int) -> bool:
        """``seq`` (``new`` tokens to prefill) may start its chunks this step: room for ``ALIGN`` tokens of it at
        least (a 6-token chat is not cut in two: it waits a step), and it is short or no long prompt is being
        chunked."""
        return room >= ALIGN and (new <= SHORT or not any(_rest(s) > SHORT for s in self.chunking))

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
        """The prefix cache may hold what the running sequences' charges leave of the budget (it evicts down); the
        tiers' spare rows, what is left after the prefix cache's whole budget (so a spare never costs it a block)."""
        room = self.budget_tokens - self.charged - self.tiers.slack
        if self.prefix is not None:
            self.prefix.limit(max(0, room) * self.tiers.bytes_per_token)
            room -= -(-self.prefix.budget_bytes // self.tiers.bytes_per_token)
        self.tiers.keep_spare(max(0, room))

    def prefilled(self, step: Step, seqs: list[Sequence]) -> list[Sequence]:
        """``seqs`` of a prefill step ran; return those whose whole prompt is in their slot now (their next token
        is due).  The prefix cache gets their blocks at ``save_prefixes``, after the hand-off."""
        done = []
        for seq in seqs:
            seq.cached += step.chunk_of(seq)
            if seq.cached < len(seq.prompt_ids):
                continue
            if seq in self.chunking:
                self.chunking.remove(seq)
                self.tiers.unpin(seq)
            if self.prefix is not None:
                self.unsaved.append(seq)
            done.append(seq)
        return done

    def save_prefixes(self) -> None:
        """Let the prefix cache keep the blocks of the prompts that became whole this step, once their first tokens
        are handed out: copying a long prompt's blocks took 45-65 ms, which its first token no longer waits for."""
        if self.prefix is not None:
            for seq in self.unsaved:
                self.prefix.save(seq.prompt_ids, seq.adapter, self.tiers.cache(seq), seq.slot)
        self.unsaved.clear()

    def finish(self, seq: Sequence, answered: bool = False) -> None:
        """Take a sequence out, wherever it is; its slot and its charge are freed.  ``answered``: it ended with
        its answer (a stop or its length), so the prefix cache may keep the whole blocks of its prompt and answer
        alike: a chat's next turn resends both."""
        seq.status = SequenceStatus.FINISHED
        if seq.tier < 0:
            if seq in self.waiting:
                self.waiting.remove(seq)
            return
        if seq in self.unsaved:  # whole this step and finished at its first token: saved now, while it is placed
            self.unsaved.remove(seq)
            if not answered and self.prefix is not None:
                self.prefix.save(seq.prompt_ids, seq.adapter, self.tiers.cache(seq), seq.slot)
        if seq in self.chunking:  # (a Sequence compares by identity)
            self.chunking.remove(seq)
        elif answered and self.prefix is not None:
            # every token but the last sampled one went through the model: its keys and values are in the slot
            self.prefix.save(seq.prompt_ids + seq.output_ids, seq.adapter, self.tiers.cache(seq), seq.slot)
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


def _rest(seq: Sequence) -> int:
    """The tokens of ``seq``'s prompt not yet in its slot."""
    return len(seq.prompt_ids) - seq.cached


def _pairs(seq: Sequence, new: int) -> float:
    """Query-key pairs the attention of ``seq``'s next ``new`` prompt tokens reads (each sees every token before
    it)."""
    return new * (seq.cached + new / 2)


def _aligned(cached: int, chunk: int, length: int) -> int:
    """``chunk`` tokens from ``cached`` of a ``length``-token prompt, cut to end on a query block (on a multiple of
    ``ALIGN`` when shorter than two) unless the prompt has no more than ``_UNCUT`` such chunks left (a cut could
    then cost it a step of its own: a chat's next turn, 100-200 new tokens, goes on as the pace allows), or the cut
    would leave none."""
    if length - cached <= _UNCUT * chunk:
        return chunk
    unit = QUERY_BLOCK if chunk >= 2 * QUERY_BLOCK else ALIGN  # a block's cut costs a shorter chunk at most half
    end = (cached + chunk) // unit * unit
    return end - cached if end > cached else chunk
