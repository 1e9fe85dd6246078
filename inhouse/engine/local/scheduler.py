"""Decides what the next engine step runs: a token for every running sequence, and prompt tokens beside them.

Owns the waiting queue, the running list, and admission by memory: a sequence leaves the queue only while the
KV memory the running ones may come to hold, plus its own (``KVTiers.charge`` of its prompt plus its
``max_tokens``), plus the tiers' slack, fits the model's budget; otherwise it waits (first come, first served),
and nothing is ever cut short for room.  What the running sequences leave of the budget is the prefix cache's,
and what that leaves may hold the tiers' spare rows (``KVTiers.keep_spare``).
A sequence given a slot gets its prompt's longest cached prefix copied in first (when there is a prefix cache),
and its prefill then runs only the rest.

Every step decodes every running sequence, and takes waiting prompts into the same forward pass (one read of the
weights for both).  When nothing is decoding, a step takes up to ``max_prefill_tokens`` prompt tokens, but a
prompt already being chunked goes on ``chunk_tokens`` at a time (short prompts that arrive go in beside).  While
sequences decode, with chunked prefill on (``chunk_tokens`` > 0), a step takes only what ``Pace`` allows (at most
``chunk_tokens``): a prompt longer than that is prefilled in chunks, one per step, so its arrival slows the
running streams' next token by a fraction of a step rather than stalling them for its whole prefill.  One prompt
at a time is chunked (the tiers' pinned sequence meanwhile); short prompts (``SHORT`` tokens together) that come
meanwhile go in whole beside its chunks (the chunk skips a step they fill), longer ones wait for it.

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

SHORT = 64  # prompt tokens a step takes whole beside decode rows, whatever the pace allows (short chats)
ALIGN = 16  # a chunk shorter than a query block ends on a multiple of this (a divisor of QUERY_BLOCK)
_UNCUT = 4  # a prompt's last chunks, as many as this, are not cut to a block


@dataclass(frozen=True, slots=True)
class Step:
    """One forward pass: a token for each of ``decode``, and the prompts of ``prefill`` (the rest of each, and,
    with ``chunk``, the next ``chunk`` tokens of the last, the prompt being chunked); ``prompt_tokens`` in all."""

    decode: list[Sequence]
    prefill: list[Sequence]
    chunk: int = 0
    prompt_tokens: int = 0
    pairs: float = 0.0  # query-key pairs the prompt tokens' attention reads (``Pace``)

    @property
    def seqs(self) -> list[Sequence]:
        return [*self.decode, *self.prefill]

    def chunk_of(self, seq: Sequence) -> int:
        """The tokens of ``seq``'s prompt this step runs when it is the prompt being chunked (the last); 0: the rest."""
        return self.chunk if self.prefill and seq is self.prefill[-1] else 0


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
        self.chunking: Sequence | None = None  # the prompt being prefilled in chunks
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
        """The running sequences' next tokens, and as many prompt tokens beside them as the step may take."""
        decode = self.tiers.prepare_decode() if self.running else []
        if self.chunking is not None:  # its next chunk, and short prompts that came since go in whole beside it
            shorts, _ = self._admit(0, True, whole_only=True)
            return self._with_chunk(decode, shorts, self.chunking)
        prefill, chunking = self._admit(self._prompt_budget(len(decode)), bool(decode))
        if chunking:
            return self._with_chunk(decode, prefill[:-1], prefill[-1])
        if not decode and not prefill:
            return None
        return Step(decode, prefill, 0, *_whole(prefill))

    def _prompt_budget(self, decoding: int) -> int:
        """While ``decoding`` sequences decode, what the pace allows a new prompt (chunking on); otherwise a whole
        batch of prompts."""
        if self.pace is None or not decoding:
            return self.max_prefill_tokens
        return self.pace.budget(decoding)

    def _with_chunk(self, decode: list[Sequence], whole: list[Sequence], seq: Sequence) -> Step:
        """``whole`` prompts, and the next chunk of ``seq``: as much of it as the pace allows beside them."""
        tokens, pairs = _whole(whole)
        if not decode:
            # nothing decodes (the streams all finished): its next ``chunk_tokens``, not its whole rest, so a chat
            # that arrives meanwhile waits for one chunk rather than for seconds of prefill
            budget = max(1, min(self.chunk_tokens, self.max_prefill_tokens) - tokens)
        else:
            assert self.pace is not None, "a prompt is chunked only with chunked prefill on, which has a pace"
            budget = self.pace.budget(len(decode), seq.cached, tokens, pairs)
        if not budget:  # the short prompts took the step's time: the chunk waits for the next step
            return Step(decode, whole, 0, tokens, pairs)
        chunk = _aligned(seq.cached, min(budget, len(seq.prompt_ids) - seq.cached), len(seq.prompt_ids))
        return Step(decode, [*whole, seq], chunk, tokens + chunk, pairs + _pairs(seq, chunk))

    def _admit(self, budget: int, decoding: bool, whole_only: bool = False) -> tuple[list[Sequence], bool]:
        """Waiting prompts that fit in slots, memory and ``budget`` new tokens (while others decode, prompts of up
        to ``SHORT`` tokens together always fit: a short chat goes in whole, never chunked), placed; or one too long
        for it, alone, to be chunked (chunking on: then True).  A prompt longer than the budget with chunking off
        runs alone.  ``whole_only`` (another prompt is being chunked): only those short prompts, first come first
        served."""
        room = max(budget, min(SHORT, self.chunk_tokens)) if decoding else budget
        batch: list[Sequence] = []
        tokens = 0
        while self.waiting and len(self.running) < self.max_num_seqs and self.fits(self.waiting[0]):
            head = self.waiting[0]
            new = len(head.prompt_ids) - (self.prefix.match(head.prompt_ids, head.adapter) if self.prefix else 0)
            if tokens + new > room and (batch or whole_only):
                break
            self._place(self.waiting.popleft())
            batch.append(head)
            new = len(head.prompt_ids) - head.cached
            if new > room and self.chunk_tokens:
                self.chunking = self.tiers.pinned = head
                return batch, True
            tokens += new
            if tokens >= room:
                break
        return batch, False

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
            chunk = step.chunk_of(seq)
            seq.cached = seq.cached + chunk if chunk else len(seq.prompt_ids)
            if seq.cached < len(seq.prompt_ids):
                continue
            if seq is self.chunking:
                self.chunking = self.tiers.pinned = None
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
        if seq is self.chunking:
            self.chunking = None
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


def _whole(seqs: list[Sequence]) -> tuple[int, float]:
    """The prompt tokens and query-key pairs of the rest of each of ``seqs``' prompts."""
    news = [len(seq.prompt_ids) - seq.cached for seq in seqs]
    return sum(news), sum(map(_pairs, seqs, news))


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
