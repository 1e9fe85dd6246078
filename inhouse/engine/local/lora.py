"""LoRA adapters over one base model in the local engine: per-row low-rank updates, never merged.

Owns the adapters' weights in memory (read and checked by ``inhouse.engine.peft``), the set of registered
adapters with its least-recently-used bound on the ones held in memory (an evicted adapter is read from disk
again when a request needs it), and ``LoraLinear``, the wrapper that a targeted module of the base becomes.

In a forward pass, ``LoraContext`` says which adapter each flat token row is on (set by the runner before the
pass, cleared after).  ``LoraLinear`` computes the base output for every token, then adds each row's own
adapter's ``scale * (x @ A^T) @ B^T``: in decode as one stacked low-rank product over all the pass's adapters
with a row mask (a handful of tensor operations per module, whatever the number of adapters, in the spirit
of S-LoRA's and vLLM's multi-LoRA kernels), in a big prefill per adapter over its own gathered tokens.  Rows
of the bare base get nothing added.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from inhouse.engine.peft import AdapterError, linear_shapes, read_peft

__all__ = ["AdapterError", "AdapterWeights", "LoraContext", "LoraLinear", "LoraSet", "read_adapter"]

_MASKED_TOKENS = 256  # passes with at most this many tokens compute every adapter on every token, masked


@dataclass(frozen=True)
class AdapterWeights:
    """One adapter in memory: module path in the base → (A ``[r, in]``, B ``[out, r]``, scale).  A and B are
    float32 over a bf16/fp16 base: the update is computed and added in float32, then rounded once (as PEFT)."""

    name: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]


@dataclass
class LoraContext:
    """The current forward pass's adapters, set by the runner before the pass and cleared after.

    ``groups``: (flat token indices, weights) per adapter in the pass, ordered by name; ``slots``: each flat
    token's position in ``groups`` (-1 on the bare base's rows); ``memo``: what the modules of one pass share
    (the row masks, the per-row scales, the float32 copy of an input that several modules read).
    """

    groups: list[tuple[torch.Tensor, AdapterWeights]] = field(default_factory=list)
    slots: torch.Tensor | None = None
    memo: dict[Any, Any] = field(default_factory=dict)

    def set(self, groups: list[tuple[torch.Tensor, AdapterWeights]], slots: torch.Tensor | None) -> None:
        self.groups, self.slots, self.memo = groups, slots, {}

    def clear(self) -> None:
        self.set([], None)

    def mask(self, positions: tuple[int, ...], ranks: tuple[int, ...], columns: torch.Tensor) -> torch.Tensor | None:
        """``[tokens, sum(ranks)]``: 1 where a column belongs to the token's own adapter; None when every token
        is on the one adapter present (nothing to mask)."""
        key = ("mask", positions, ranks)
        if key not in self.memo:
            assert self.slots is not None
            only = len(positions) == 1 and bool((self.slots == positions[0]).all())
            self.memo[key] = None if only else (columns.unsqueeze(0) == self.slots.unsqueeze(1)).to(torch.float32)
        found: torch.Tensor | None = self.memo[key]
        return found

    def scale(self, positions: tuple[int, ...], scales: tuple[float, ...]) -> torch.Tensor | float:
        """Each token's own adapter scale, ``[tokens, 1]`` (0 on base rows), or one float when all share one."""
        if len(set(scales)) == 1 and (len(positions) == len(self.groups)):
            return scales[0]
        key = ("scale", positions, scales)
        if key not in self.memo:
            assert self.slots is not None
            table = torch.zeros(len(self.groups) + 1, dtype=torch.float32, device=self.slots.device)
            for position, value in zip(positions, scales, strict=True):
                table[position + 1] = value
            self.memo[key] = table[self.slots + 1].unsqueeze(1)
        found: torch.Tensor = self.memo[key]
        return found

    def as_float(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``x`` in the adapters' dtype, converted once for the modules that read the same input (q, k, v)."""
        last = self.memo.get("x")
        if last is not None and last[0] is x:  # the same tensor object (held here, so its id is not reused)
            converted: torch.Tensor = last[1]
            return converted
        converted = x.to(dtype)
        self.memo["x"] = (x, converted)
        return converted


class LoraLinear(torch.nn.Module):
    """A targeted module of the base: its own output, plus each adapter's update on that adapter's tokens.

    With few tokens (decode) the adapters of the pass run as one low-rank product: their A matrices stacked
    ``[sum r, in]``, their B matrices side by side ``[out, sum r]`` (kept from the last pass while the same
    adapters run), and a mask that keeps each token's own adapter's columns of ``x @ A^T``; the sum over the
    other adapters' columns adds exact zeros, so a row gets exactly its adapter's ``(x @ A^T) @ B^T * scale``,
    as PEFT computes it.  A big prefill instead gathers each adapter's own tokens.
    """

    def __init__(self, base: torch.nn.Module, path: str, context: LoraContext) -> None:
        super().__init__()
        self.base = base
        self.path = path
        self.context = context
        # the last pass's stacked weights: (the (A, B, scale) of each adapter, stacked A, stacked B, column owner)
        self._stacked: tuple[tuple[Any, ...], torch.Tensor, torch.Tensor, torch.Tensor, tuple[float, ...]] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x)
        present = [(i, found) for i, (_, weights) in enumerate(self.context.groups)
                   if (found := weights.modules.get(self.path)) is not None]
        if not present:
            return out
        flat_x = x.reshape(-1, x.shape[-1])
        flat_out = out.view(-1, out.shape[-1])
        dtype = present[0][1][0].dtype
        if flat_x.shape[0] > _MASKED_TOKENS:  # a big prefill: each adapter's own tokens only
            for i, (a, b, scale) in present:
                index = self.context.groups[i][0]
                rows = flat_x.index_select(0, index).to(a.dtype)
                delta = F.linear(F.linear(rows, a), b) * scale
                flat_out[index] = (flat_out.index_select(0, index).to(a.dtype) + delta).to(out.dtype)
            return out
        positions = tuple(i for i, _ in present)
        a, b, columns, scales = self._stack(present)
        hidden = F.linear(self.context.as_float(flat_x, dtype), a)
        mask = self.context.mask(positions, tuple(found[0].shape[0] for _, found in present), columns)
        if mask is not None:
            hidden.mul_(mask)
        delta = F.linear(hidden, b)
        if any(s != 1.0 for s in scales):
            delta.mul_(self.context.scale(positions, scales))
        # as PEFT: the sum in float32 (an in-place add computes in the wider dtype), rounded once to the model's
        flat_out.add_(delta)
        return out

    def forget(self) -> None:
        self._stacked = None

    def _stack(self, present: list[tuple[int, tuple[torch.Tensor, torch.Tensor, float]]]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[float, ...]]:
        """The stacked A and B of these adapters, which group owns each of the ``sum r`` columns, and the scale
        each adapter's product is still to be multiplied by.  A scale that is a power of two is folded into the
        stacked A: ``x (2^k A)^T B^T`` equals ``(x A^T B^T) 2^k`` bit for bit, so the multiply is saved."""
        held = self._stacked
        if held is not None and len(held[0]) == len(present) and all(
                kept is found and kept_at == i for (kept_at, kept), (i, found) in zip(held[0], present, strict=True)):
            return held[1], held[2], held[3], held[4]
        folded = [_exact_factor(found[2]) for _, found in present]
        parts = [found[0] * found[2] if fold else found[0] for (_, found), fold in zip(present, folded, strict=True)]
        a = parts[0] if len(parts) == 1 else torch.cat(parts)
        b = present[0][1][1] if len(present) == 1 else torch.cat([found[1] for _, found in present], dim=1).contiguous()
        columns = torch.repeat_interleave(torch.tensor([i for i, _ in present], device=a.device),
                                          torch.tensor([found[0].shape[0] for _, found in present], device=a.device))
        scales = tuple(1.0 if fold else found[2] for (_, found), fold in zip(present, folded, strict=True))
        self._stacked = (tuple(present), a, b, columns, scales)
        return a, b, columns, scales


def _exact_factor(scale: float) -> bool:
    """A power of two in a range where multiplying float32 weights by it is exact (alpha = r or 2r: 1, 2)."""
    mantissa, exponent = math.frexp(scale)
    return mantissa == 0.5 and -8 <= exponent <= 9


def read_adapter(name: str, directory: Path, model: torch.nn.Module, dtype: torch.dtype,
                 device: torch.device) -> AdapterWeights:
    """The adapter in ``directory``, checked against ``model``'s modules; AdapterError says what does not fit."""
    peft = read_peft(name, directory, linear_shapes(model))
    # float32 for a half-precision base, as PEFT's autocast_adapter_dtype does (and faster on CPU)
    keep = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    return AdapterWeights(name, {path: (a.to(device=device, dtype=keep).contiguous(),
                                        b.to(device=device, dtype=keep).contiguous(), scale)
                                 for path, (a, b, scale) in peft.modules.items()})


class LoraSet:
    """The adapters one engine serves: name → directory (registered), and at most ``max_loras`` in memory.

    ``register`` runs in a worker thread (it reads and checks the files, and wraps the targeted modules);
    ``weights`` runs on the engine thread before a step and reads an evicted adapter back from disk.
    """

    def __init__(self, model: torch.nn.Module, max_loras: int, dtype: torch.dtype, device: torch.device) -> None:
        self.model = model
        self.max_loras = max_loras
        self.context = LoraContext()
        self._dtype, self._device = dtype, device
        self._lock = threading.Lock()
        self._paths: dict[str, Path] = {}
        # unregistered: refused to new requests, but a request still running past the drain can read it back
        self._retired: dict[str, Path] = {}
        self._resident: OrderedDict[str, AdapterWeights] = OrderedDict()  # least recently used first
        self._registrations: dict[str, int] = {}  # name → which registration (the prefix cache's key)
        self.loads = 0  # reads from disk, first ones included
        self.most_mixed = 0  # the most kinds of rows (adapters, and the bare base) one forward pass has run

    def register(self, name: str, directory: Path) -> AdapterWeights:
        """Read, check and register an adapter (resident at once); AdapterError when it does not fit."""
        weights = read_adapter(name, directory, self.model, self._dtype, self._device)
        with self._lock:
            self._wrap(weights)
            self._paths[name] = directory
            self._registrations[name] = max(self._registrations.values(), default=0) + 1
            self._retired.pop(name, None)
            self._keep(weights, frozenset())
            self.loads += 1
        return weights

    def unregister(self, name: str) -> None:
        with self._lock:
            directory = self._paths.pop(name, None)
            if directory is not None:
                self._retired[name] = directory
            if self._resident.pop(name, None) is not None:
                self._forget_stacks()

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._paths)

    def identity(self, name: str) -> str:
        """The adapter's name and registration: registering a name again (new weights) gives a new identity."""
        with self._lock:
            return f"{name}#{self._registrations.get(name, 0)}"

    def resident(self) -> list[str]:
        with self._lock:
            return list(self._resident)

    def weights(self, name: str, step: frozenset[str]) -> AdapterWeights:
        """The adapter's weights for a step (``step``: every adapter in it, which eviction spares)."""
        with self._lock:
            found = self._resident.get(name)
            if found is not None:
                self._resident.move_to_end(name)
                return found
            directory = self._paths.get(name) or self._retired.get(name)
        if directory is None:
            raise KeyError(f"adapter {name!r} is not registered")
        weights = read_adapter(name, directory, self.model, self._dtype, self._device)
        with self._lock:
            self._keep(weights, step)
            self.loads += 1
        return weights

    def _keep(self, weights: AdapterWeights, spare: frozenset[str]) -> None:
        self._resident[weights.name] = weights
        self._resident.move_to_end(weights.name)
        for name in list(self._resident):
            if len(self._resident) <= self.max_loras:
                break
            if name not in spare and name != weights.name:
                del self._resident[name]
                self._forget_stacks()

    def _forget_stacks(self) -> None:
        """Let go of the stacked weights the modules keep, so an adapter dropped from memory is freed."""
        for module in self.model.modules():
            if isinstance(module, LoraLinear):
                module.forget()

    def _wrap(self, weights: AdapterWeights) -> None:
        """Make each module the adapter targets a LoraLinear (once; the wrapper adds nothing to base rows)."""
        for path in weights.modules:
            parent_path, _, child = path.rpartition(".")
            parent = self.model.get_submodule(parent_path) if parent_path else self.model
            module = getattr(parent, child)
            if not isinstance(module, LoraLinear):
                setattr(parent, child, LoraLinear(module, path, self.context))
