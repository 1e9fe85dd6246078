"""Runs the model for one scheduler step: a prefill of new sequences or a decode of running ones.

Owns building the tensors of a step (ids, positions, masks) and returning last-position logits, and
preparing the model once for fast steps: on CPU, the model's bf16 ``nn.Linear`` layers are replaced,
in place, by ones whose weight oneDNN reordered into its blocked layout up front rather than on every
call (the same results bit for bit, a third less time in the linear layers; inference on CPU only).
Knows nothing about sampling, stopping or requests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from typing import Protocol

import torch

from inhouse.engine.local.attention import BatchLayout
from inhouse.engine.local.kv_cache import SlotKVCache
from inhouse.engine.local.lora import AdapterWeights, LoraSet

__all__ = ["ModelRunner", "RunnableSequence"]


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


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cache: SlotKVCache, device: torch.device,
                 lora: LoraSet | None = None) -> None:
        self.model = model
        self.cache = cache
        self.device = device
        self.lora = lora
        if device.type == "cpu" and cache.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            _prepack_linears(model)

    @torch.inference_mode()
    def prefill(self, seqs: Seq[RunnableSequence], first_slot: int, chunk: int = 0) -> torch.Tensor:
        """Fill the cache for new sequences in slots ``first_slot..``; return their next-token logits.

        The prompts run packed back to back in one row, so no compute goes to padding.  A sequence whose
        first ``cached`` prompt positions are already in its slot (the prefix cache's, or earlier chunks') runs
        only the rest, or only its next ``chunk`` tokens (then the logits are those of the chunk's last token).
        """
        self.cache.reserve(max(len(s.prompt_ids) for s in seqs))
        ends = [min(s.cached + chunk, len(s.prompt_ids)) if chunk else len(s.prompt_ids) for s in seqs]
        offsets = [s.cached for s in seqs]
        lengths = [end - s.cached for s, end in zip(seqs, ends, strict=True)]
        ids = torch.tensor([t for s, end in zip(seqs, ends, strict=True) for t in s.prompt_ids[s.cached : end]],
                           dtype=torch.long)
        positions = torch.cat([torch.arange(s.cached, end) for s, end in zip(seqs, ends, strict=True)])
        counts = torch.tensor(lengths)
        slot_of = list(range(first_slot, first_slot + len(seqs)))
        slots = torch.tensor(slot_of).repeat_interleave(counts)
        layout = BatchLayout(
            cache=self.cache,
            is_prefill=True,
            cache_rows=self.cache.rows_at(slots, positions).to(self.device),
            lengths=tuple(lengths),
            offsets=tuple(offsets) if any(offsets) else (),
            slots=tuple(slot_of),
        )
        last = (counts.cumsum(0) - 1).to(self.device)
        with self._adapters(seqs, lengths):
            return self._forward(ids.view(1, -1), positions.view(1, -1), layout, last)[0]

    @torch.inference_mode()
    def decode(self, seqs: Seq[RunnableSequence], hold: int = 0) -> torch.Tensor:
        """One token for each running sequence (sequence i in slot i); return next-token logits.  ``hold``: tokens
        a slot after theirs holds (a prompt being prefilled in chunks), which the cache must keep."""
        write_at = [s.length - 1 for s in seqs]
        kv_length = max(write_at) + 1
        self.cache.fit(max(kv_length, hold))
        positions = torch.tensor(write_at, dtype=torch.long)
        ids = torch.tensor([[s.last_token] for s in seqs], dtype=torch.long)
        layout = BatchLayout(
            cache=self.cache,
            is_prefill=False,
            cache_rows=self.cache.rows_at(torch.arange(len(seqs)), positions).to(self.device),
            mask=_decode_mask(positions, self.cache.capacity).to(self.device),
            kv_length=kv_length,
        )
        with self._adapters(seqs, [1] * len(seqs)):
            return self._forward(ids, positions.view(-1, 1), layout, 1)[:, -1]

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
        out = self.model(
            input_ids=ids.to(self.device),
            position_ids=positions.to(self.device),
            use_cache=False,
            logits_to_keep=keep,
            inhouse_batch=layout,
        )
        logits: torch.Tensor = out.logits
        return logits.float()


def _decode_mask(positions: torch.Tensor, capacity: int) -> torch.Tensor:
    """Additive float32 ``[n, 1, 1, capacity]``: row i sees cache positions ``0..positions[i]``."""
    hidden = torch.arange(capacity).view(1, 1, 1, -1) > positions.view(-1, 1, 1, 1)
    return torch.zeros(hidden.shape, dtype=torch.float32).masked_fill_(hidden, float("-inf"))


class _PackedLinear(torch.nn.Module):
    """A bf16 ``nn.Linear`` whose weight oneDNN reordered once rather than on every call (no autograd)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")  # type: ignore[no-any-return]


def _prepack_linears(model: torch.nn.Module) -> None:
    """Swap every plain bf16 ``nn.Linear`` of ``model`` for a ``_PackedLinear`` (idempotent)."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is torch.nn.Linear and child.weight.dtype == torch.bfloat16:
                setattr(parent, name, _PackedLinear(child))
