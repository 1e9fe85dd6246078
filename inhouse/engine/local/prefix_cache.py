"""The prefix cache of the local engine: the KV of prompt prefixes, kept across requests.

Owns the stored blocks, their keys and their least-recently-used order under a byte budget.  A prompt is cut
into blocks of ``BLOCK`` tokens; block i's key is a digest chained over the key of block i-1 and its own token
ids, and the chain starts from the model and the adapter identity (a prefix computed under one LoRA adapter is
never reused for another one or for the bare base).  A block holds copies of its keys and values for every
layer, ``[layers, 2, kv_heads, BLOCK, head_dim]``, taken from a sequence's slot (in its tier of the KV cache)
after its prefill (and, at a finish with an answer, those of prompt and answer: a chat's next turn resends both)
and copied back into a new sequence's slot before its prefill, which then computes only the rest.
Its memory is part of the model's KV budget: it holds at most ``budget_bytes``, and at most what the running
sequences leave (``limit``), evicting down when they need more.

The last token of a prompt is never served from here: the prefill must run it to produce the next-token
logits.  Used only by the engine thread; a block is copied out synchronously, so nothing can evict it while
it is read.  Eviction takes the least recently used block first, and a chain is touched from its end to its
start, so the leaves of a chain go before its root.  Holds no sequences and no model.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable
from collections.abc import Sequence as Seq

import torch

from inhouse.engine.local.kv_cache import SlotKVCache

__all__ = ["BLOCK", "PrefixCache"]

BLOCK = 64  # tokens per block: prefixes are reused in whole blocks


class PrefixCache:
    def __init__(self, bytes_per_token: int, budget_bytes: int, identity: str,
                 adapter_identity: Callable[[str], str] = str) -> None:
        """``bytes_per_token``: the KV cache's; ``identity``: the model's; ``adapter_identity(name)``: an adapter's
        (changes when it is re-registered)."""
        self.budget_bytes = budget_bytes
        self.limit_bytes = budget_bytes  # what the running sequences leave of the KV budget (``limit``)
        self._adapter_identity = adapter_identity
        self._root = hashlib.blake2b(identity.encode(), digest_size=16).digest()
        self._blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # least recently used first
        self.block_bytes = BLOCK * bytes_per_token
        # counters read by stats() from other threads (plain ints)
        self.hits = 0  # prompt tokens whose KV was copied from here
        self.misses = 0  # prompt tokens looked up and not found (prefilled)
        self.evictions = 0  # blocks dropped to stay within the budget

    @property
    def held_bytes(self) -> int:
        return len(self._blocks) * self.block_bytes

    def keys(self, prompt_ids: Seq[int], adapter: str | None) -> list[bytes]:
        """The chained key of every whole block of the prompt but its last token."""
        tag = b"base" if adapter is None else b"adapter:" + self._adapter_identity(adapter).encode()
        digest = hashlib.blake2b(self._root + tag, digest_size=16).digest()
        chain = []
        for start in range(0, (len(prompt_ids) - 1) // BLOCK * BLOCK, BLOCK):
            tokens = array("q", prompt_ids[start : start + BLOCK]).tobytes()
            digest = hashlib.blake2b(digest + tokens, digest_size=16).digest()
            chain.append(digest)
        return chain

    def match(self, prompt_ids: Seq[int], adapter: str | None) -> int:
        """How many tokens of the prompt ``load`` would supply now (nothing is copied or counted)."""
        return len(self._found(prompt_ids, adapter)) * BLOCK

    def _found(self, prompt_ids: Seq[int], adapter: str | None) -> list[tuple[bytes, torch.Tensor]]:
        found = []
        for key in self.keys(prompt_ids, adapter):
            block = self._blocks.get(key)
            if block is None:
                break
            found.append((key, block))
        return found

    def limit(self, limit_bytes: int) -> None:
        """Hold no more than ``limit_bytes`` (and ``budget_bytes``) from now on: evict down to it at once."""
        self.limit_bytes = limit_bytes
        while self._blocks and self.held_bytes > min(self.budget_bytes, limit_bytes):
            self._blocks.popitem(last=False)
            self.evictions += 1

    @torch.inference_mode()
    def load(self, prompt_ids: Seq[int], adapter: str | None, cache: SlotKVCache, slot: int) -> int:
        """Copy the longest cached prefix of the prompt into ``slot`` of ``cache`` (room for the prompt reserved);
        return how many tokens it holds."""
        found = self._found(prompt_ids, adapter)
        for key, _ in reversed(found):
            self._blocks.move_to_end(key)
        cached = len(found) * BLOCK
        self.hits += cached
        self.misses += len(prompt_ids) - cached
        if not found:
            return 0
        for i, (_, block) in enumerate(found):
            cache.load(block, slot, i * BLOCK)
        return cached

    @torch.inference_mode()
    def save(self, prompt_ids: Seq[int], adapter: str | None, cache: SlotKVCache, slot: int) -> None:
        """Keep the whole blocks of ``prompt_ids`` (all but the last token in ``slot`` of ``cache``: a prompt just
        prefilled, or a prompt and its answer) not kept yet, within the budget."""
        if self.block_bytes > min(self.budget_bytes, self.limit_bytes):
            return
        chain = self.keys(prompt_ids, adapter)
        own = set(chain)
        for i, key in enumerate(chain):
            if key in self._blocks:
                continue
            if not self._make_room(own):
                break  # only this prompt's own blocks are left to evict: keep its start, not its end
            self._blocks[key] = cache.read(slot, i * BLOCK, BLOCK)
        for key in reversed(chain):
            if key in self._blocks:
                self._blocks.move_to_end(key)

    def _make_room(self, spare: set[bytes]) -> bool:
        """Evict least recently used blocks until one more fits; False when that would take a ``spare`` one."""
        while self.held_bytes + self.block_bytes > min(self.budget_bytes, self.limit_bytes):
            oldest = next(iter(self._blocks))
            if oldest in spare:
                return False
            del self._blocks[oldest]
            self.evictions += 1
        return True

    def clear(self) -> None:
        self._blocks.clear()
