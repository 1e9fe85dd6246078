"""Runs the model for one scheduler step: a token for each running sequence and the prompts beside them, in one pass.

Owns building the tensors of a step (ids, positions, masks) and returning last-position logits, and
preparing the model once for fast steps: on CPU, a bf16 model's linear layers are packed for oneDNN and
sibling projections stacked into one matmul (``linears.py``), and a Llama-family model's forward runs written
out (``decoder.py``); both give the same results bit for bit.  Keeps a chunked prompt's keys and values packed for
the compiled prefill kernel between its chunks (``attention_kernel.PackedPrompt``), and lets go of them once it is
whole.  Knows nothing about sampling, stopping or requests.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from typing import Any, Protocol

import torch

from inhouse.engine.local.attention import BLOCKED_FROM, BatchLayout, DecodeGroup, Placement, flash_masks
from inhouse.engine.local.attention_kernel import AttentionKernel, PackedPrompt
from inhouse.engine.local.decoder import DirectForward
from inhouse.engine.local.kv_tiers import KVTiers
from inhouse.engine.local.linear_kernel import LinearKernel
from inhouse.engine.local.linears import fast_linears
from inhouse.engine.local.lora import AdapterWeights, LoraSet

__all__ = ["ModelRunner", "RunnableSequence"]

_KEEP_BYTES = 512 << 20  # the most a chunked prompt's packed keys and values may take (its slot's size), else none


class RunnableSequence(Protocol):
    """What the runner reads of a sequence (``Sequence`` in the engine)."""

    @property
    def prompt_ids(self) -> list[int]: ...

    @property
    def length(self) -> int: ...

    @property
    def last_token(self) -> int: ...

    @property
    def adapter(self) -> str | None: ...

    @property
    def cached(self) -> int: ...

    @property
    def tier(self) -> int: ...

    @property
    def slot(self) -> int: ...


class ModelRunner:
    def __init__(self, model: torch.nn.Module, tiers: KVTiers[Any], device: torch.device,
                 lora: LoraSet | None = None, kernel: AttentionKernel | None = None, flash: bool = False,
                 linear_kernel: LinearKernel | None = None) -> None:
        self.model = model
        self.tiers = tiers
        self.device = device
        self.lora = lora
        self.kernel = kernel  # bf16 attention, compiled, for long prompts and decode rows (None: PyTorch's)
        self.flash = flash and tiers.dtype == torch.bfloat16  # long prompts by flash attention (``prefers_flash``)
        self.direct = DirectForward.for_model(model)  # None: the model's own forward
        self._kept: dict[int, tuple[RunnableSequence, PackedPrompt]] = {}  # chunked prompts' packed keys (``_keep``)
        if device.type == "cpu" and tiers.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            fast_linears(model, linear_kernel)  # the compiled linear layers where they run, else oneDNN's

    def prefill(self, seqs: Seq[RunnableSequence], chunks: Seq[int] = ()) -> torch.Tensor:
        """A step of prompts alone (see ``run``)."""
        return self.run((), seqs, chunks)

    def decode(self, seqs: Seq[RunnableSequence]) -> torch.Tensor:
        """A step of decode rows alone (see ``run``)."""
        return self.run(seqs, ())

    @torch.inference_mode()
    def run(self, decode: Seq[RunnableSequence], prefill: Seq[RunnableSequence], chunks: Seq[int] = ()) -> torch.Tensor:
        """One forward pass: a token for each of ``decode`` and the prompts of ``prefill``; return next-token logits,
        one row each, ``decode``'s then ``prefill``'s.

        ``decode`` comes tier by tier and, in a tier, from its slot 0 on, the tiers sized for the step
        (``KVTiers.prepare_decode``); ``prefill``'s sequences are placed, room reserved.  The prompts run packed
        back to back in one row (after the decode rows' tokens, when there are both: one pass reads the weights
        once for all of them), so no compute goes to padding.  A sequence whose first ``cached`` prompt positions
        are already in its slot (the prefix cache's, or earlier chunks') runs only the rest; with ``chunks``, each
        of ``prefill`` runs only its next ``chunks[i]`` tokens (then its logits are those of the chunk's last token).
        """
        self._forget_whole()
        ends = [len(s.prompt_ids) for s in prefill]
        if chunks:
            ends = [min(s.cached + chunk, end) for s, chunk, end in zip(prefill, chunks, ends, strict=True)]
        lengths = [end - s.cached for s, end in zip(prefill, ends, strict=True)]
        n = len(decode)
        ids = [s.last_token for s in decode]
        ids += [t for s, end in zip(prefill, ends, strict=True) for t in s.prompt_ids[s.cached : end]]
        write_at = [s.length - 1 for s in decode]
        positions = torch.cat([torch.tensor(write_at, dtype=torch.long),
                               *[torch.arange(s.cached, end) for s, end in zip(prefill, ends, strict=True)]])
        starts = [n, *(n + c for c in itertools.accumulate(lengths))]
        layout = BatchLayout(
            placements=tuple(self._placement(s, start, length) for s, start, length in zip(prefill, starts[:-1],
                                                                                          lengths, strict=True)),
            groups=self._groups(decode, write_at),
            kernel=self.kernel,
        )
        with self._adapters([*decode, *prefill], [1] * n + lengths):
            if not prefill:
                return self._forward(torch.tensor(ids).view(-1, 1), positions.view(-1, 1), layout, 1)[:, -1]
            keep = torch.tensor([*range(n), *(e - 1 for e in starts[1:])], device=self.device)
            return self._forward(torch.tensor(ids).view(1, -1), positions.view(1, -1), layout, keep)[0]

    def _placement(self, seq: RunnableSequence, start: int, length: int) -> Placement:
        """Where a prompt's ``length`` new tokens go, with the flash way's masks when it takes them, or the
        compiled kernel's packed keys of its earlier chunks when it is chunked (``_keep``)."""
        cache = self.tiers.tiers[seq.tier]
        masks: tuple[torch.Tensor, ...] = ()
        if self.flash and seq.cached + length >= BLOCKED_FROM:
            masks = flash_masks(seq.cached, length, cache.capacity, self.tiers.dtype, self.device)
        return Placement(cache, seq.slot, start, length, seq.cached, masks, self._keep(seq, length))

    def _keep(self, seq: RunnableSequence, length: int) -> PackedPrompt | None:
        """The packed keys and values of ``seq``'s prompt, kept while it is chunked, for the compiled prefill kernel
        (which then packs only each chunk's own keys); None for a prompt that goes in whole, where the kernel does
        not run, or one whose packed copy would pass ``_KEEP_BYTES``."""
        kept = self._kept.get(id(seq))
        if kept is not None:
            return kept[1]
        tiers, total = self.tiers, len(seq.prompt_ids)
        if (self.kernel is None or self.flash or tiers.dtype != torch.bfloat16 or seq.cached + length >= total
                or PackedPrompt.nbytes(total, tiers.kv_heads, tiers.head_dim, tiers.num_layers) > _KEEP_BYTES):
            return None
        packed = PackedPrompt(total, tiers.kv_heads, tiers.head_dim)
        self._kept[id(seq)] = (seq, packed)
        return packed

    def _forget_whole(self) -> None:
        """Let go of the packed keys of prompts that are whole now, finished or taken out."""
        for key, (seq, _) in list(self._kept.items()):
            if seq.tier < 0 or seq.cached >= len(seq.prompt_ids):
                del self._kept[key]

    def _groups(self, decode: Seq[RunnableSequence], write_at: list[int]) -> tuple[DecodeGroup, ...]:
        """The decode rows' tiers: each a run of rows in slots 0.. of one tier."""
        groups, start = [], 0
        for _, run in itertools.groupby(decode, key=lambda s: s.tier):
            members = list(run)
            end = start + len(members)
            cache = self.tiers.tiers[members[0].tier]
            positions = torch.tensor(write_at[start:end], dtype=torch.long)
            kv_length = int(positions.max()) + 1
            masked = len(members) > 1 or kv_length >= BLOCKED_FROM  # a short lone row: SDPA (attention.py)
            assert [s.slot for s in members] == list(range(len(members))), "a tier's decode rows start at slot 0"
            groups.append(DecodeGroup(
                cache=cache, start=start, end=end,
                cache_rows=cache.rows_at(torch.arange(len(members)), positions).to(self.device),
                mask=_decode_mask(positions, cache.capacity).to(self.device) if masked else None,
                kv_length=kv_length,
                lengths=(positions + 1).to(torch.int32) if masked and self.kernel is not None else None,
            ))
            start = end
        return tuple(groups)

    @contextlib.contextmanager
    def _adapters(self, seqs: Seq[RunnableSequence], counts: Seq[int]) -> Iterator[None]:
        """During the pass, each adapter's tokens (sequence i has ``counts[i]`` consecutive flat tokens)."""
        if self.lora is None or not any(s.adapter for s in seqs):
            yield
            return
        step = frozenset(s.adapter for s in seqs if s.adapter)
        order = sorted(step)  # the same adapters in the same order from pass to pass: stacked weights are kept
        position = {name: i for i, name in enumerate(order)}
        slots = torch.tensor([position[s.adapter] if s.adapter else -1 for s in seqs], dtype=torch.long)
        slots = slots.repeat_interleave(torch.tensor(counts))
        groups: list[tuple[torch.Tensor, AdapterWeights]] = []
        for i, name in enumerate(order):
            at = (slots == i).nonzero().view(-1)
            groups.append((at.to(self.device), self.lora.weights(name, step)))
        kinds = len(groups) + (1 if any(not s.adapter for s in seqs) else 0)
        self.lora.most_mixed = max(self.lora.most_mixed, kinds)
        self.lora.context.set(groups, slots.to(self.device))
        try:
            yield
        finally:
            self.lora.context.clear()

    def _forward(
        self, ids: torch.Tensor, positions: torch.Tensor, layout: BatchLayout, keep: int | torch.Tensor
    ) -> torch.Tensor:
        """Float32 logits ``[rows, kept, vocab]`` at the last ``keep`` positions, or at the ``keep`` indices."""
        ids, positions = ids.to(self.device), positions.to(self.device)
        if self.direct is not None:
            return self.direct(ids, positions, layout, keep).float()
        out = self.model(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=keep,
                         inhouse_batch=layout)
        logits: torch.Tensor = out.logits
        return logits.float()


def _decode_mask(positions: torch.Tensor, capacity: int) -> torch.Tensor:
    """Additive float32 ``[n, 1, 1, capacity]``: row i sees cache positions ``0..positions[i]``."""
    hidden = torch.arange(capacity).view(1, 1, 1, -1) > positions.view(-1, 1, 1, 1)
    return torch.zeros(hidden.shape, dtype=torch.float32).masked_fill_(hidden, float("-inf"))
