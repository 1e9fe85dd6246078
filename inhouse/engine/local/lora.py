"""LoRA adapters over one base model in the local engine: per-row low-rank updates, never merged.

Owns the adapters' weights in memory (read and checked by ``inhouse.engine.peft``), the set of registered
adapters with its least-recently-used bound on the ones held in memory (an evicted adapter is read from disk
again when a request needs it), and ``LoraLinear``, the wrapper that a targeted module of the base becomes.

In a forward pass, ``LoraContext.groups`` lists, per adapter in the step, the flat token indices of its rows
(set by the runner before the pass, cleared after).  ``LoraLinear`` computes the base output for every token,
then for each group adds ``scale * (x @ A^T) @ B^T`` to that group's tokens only, the way S-LoRA and vLLM's
multi-LoRA kernels group tokens by adapter; rows of the bare base get nothing added.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

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
    """The current forward pass's adapters: (flat token indices, a ``[tokens, 1]`` float32 mask that is 1 on
    them, weights) per adapter in the step."""

    groups: list[tuple[torch.Tensor, torch.Tensor, AdapterWeights]] = field(default_factory=list)


class LoraLinear(torch.nn.Module):
    """A targeted module of the base: its own output, plus each adapter's update on that adapter's tokens."""

    def __init__(self, base: torch.nn.Module, path: str, context: LoraContext) -> None:
        super().__init__()
        self.base = base
        self.path = path
        self.context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x)
        groups = [(index, mask, found) for index, mask, weights in self.context.groups
                  if (found := weights.modules.get(self.path)) is not None]
        if not groups:
            return out
        flat_x = x.reshape(-1, x.shape[-1])
        flat_out = out.view(-1, out.shape[-1])
        dtype = groups[0][2][0].dtype
        if flat_x.shape[0] > _MASKED_TOKENS:  # a big prefill: each adapter's own tokens only
            for index, _, (a, b, scale) in groups:
                rows = flat_x.index_select(0, index).to(a.dtype)
                delta = F.linear(F.linear(rows, a), b) * scale
                flat_out[index] = (flat_out.index_select(0, index).to(a.dtype) + delta).to(out.dtype)
            return out
        # few tokens (decode): every adapter over every token, masked to its own rows (no gather or scatter);
        # a row gets exactly its adapter's update, plus zeros
        rows = flat_x.to(dtype)
        total: torch.Tensor | None = None
        for _, mask, (a, b, scale) in groups:
            delta = F.linear(F.linear(rows, a), b) * scale * mask
            total = delta if total is None else total + delta
        assert total is not None
        if out.dtype == dtype:
            flat_out.add_(total)
        else:  # as PEFT: the sum in float32, rounded once to the model's dtype
            flat_out.copy_(flat_out.to(dtype) + total)
        return out


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
        self.loads = 0  # reads from disk, first ones included
        self.most_mixed = 0  # the most kinds of rows (adapters, and the bare base) one forward pass has run

    def register(self, name: str, directory: Path) -> AdapterWeights:
        """Read, check and register an adapter (resident at once); AdapterError when it does not fit."""
        weights = read_adapter(name, directory, self.model, self._dtype, self._device)
        with self._lock:
            self._wrap(weights)
            self._paths[name] = directory
            self._retired.pop(name, None)
            self._keep(weights, frozenset())
            self.loads += 1
        return weights

    def unregister(self, name: str) -> None:
        with self._lock:
            directory = self._paths.pop(name, None)
            if directory is not None:
                self._retired[name] = directory
            self._resident.pop(name, None)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._paths)

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

    def _wrap(self, weights: AdapterWeights) -> None:
        """Make each module the adapter targets a LoraLinear (once; the wrapper adds nothing to base rows)."""
        for path in weights.modules:
            parent_path, _, child = path.rpartition(".")
            parent = self.model.get_submodule(parent_path) if parent_path else self.model
            module = getattr(parent, child)
            if not isinstance(module, LoraLinear):
                setattr(parent, child, LoraLinear(module, path, self.context))
