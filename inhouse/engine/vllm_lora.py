"""LoRA adapters over a model the vLLM engine serves: which adapters it knows, and the LoRARequest of each.

Owns the adapters registered on one VllmEngine (name → vLLM's ``LoRARequest(name, int id, path)``), the check
of an adapter before vLLM ever sees it (PEFT files, the base's module shapes read off a weightless copy of the
model, a rank within the ``max_lora_rank`` vLLM was started with: vLLM itself checks shapes only inside a step,
where a mismatch kills its engine core), and the rank to start vLLM with.  vLLM loads an adapter's weights
lazily by its path, keeping ``max_loras`` in the batch and as many more in CPU memory (LRU).

The CPU backend of vLLM 0.32 applies the adapter in its last slot to rows that have no adapter (its torch LoRA
ops index slot ``-1`` for "no LoRA"; vllm-project/vllm#48421), so a bare-base request batched with adapter
requests would be answered by an adapter.  On CPU every base request therefore carries the ``zero`` adapter:
a rank-1 adapter whose B is zero, made here from the first registered adapter's first module; it takes one
of vLLM's slots (the engine asks vLLM for ``max_loras + 1``) and adds exact zeros to the base's rows.
"""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from inhouse.engine.peft import AdapterError, adapter_rank, linear_shapes, read_peft

__all__ = ["VllmLoras", "base_shapes", "lora_rank"]

ZERO = "inhouse-zero-lora"  # the name of the all-zero adapter base rows carry on CPU


def lora_rank(ranks: Iterable[int], allowed: Iterable[int]) -> int:
    """The smallest rank vLLM accepts (``allowed``) that is at least every rank of ``ranks`` (no ranks: 16,
    vLLM's default); ValueError when none is large enough."""
    wanted = max(ranks, default=16)
    fitting = [r for r in sorted(allowed) if r >= wanted]
    if not fitting:
        raise ValueError(f"LoRA rank {wanted} is more than vLLM's largest max_lora_rank {max(allowed)}")
    return fitting[0]


def base_shapes(checkpoint: Path) -> dict[str, tuple[int, int]] | None:
    """Module path → (in, out) of the checkpoint's linear modules, from a weightless (meta-device) copy of the
    transformers model; None when transformers cannot build it (vLLM's own checks then stand alone)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(checkpoint, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    except (ValueError, OSError, ImportError, KeyError, TypeError):
        return None
    return linear_shapes(model)


class VllmLoras:
    """The adapters of one vLLM-served model.  ``register`` runs in a worker thread (it reads the files).

    ``make_request(name, int_id, path)``: vLLM's ``LoRARequest`` (a stand-in in unit tests)."""

    def __init__(self, model: str, max_rank: int, shapes: Mapping[str, tuple[int, int]] | None,
                 zero_for_base: bool, make_request: Callable[[str, int, str], Any]) -> None:
        self.model = model
        self._make_request = make_request
        self.max_rank = max_rank
        self._shapes = shapes
        self._zero_for_base = zero_for_base
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._requests: dict[str, tuple[int, Any]] = {}  # name → (vLLM's int id, LoRARequest)
        self._zero: Any = None  # the LoRARequest of the zero adapter, once an adapter was registered
        self._zero_dir: Path | None = None

    def register(self, name: str, directory: Path) -> tuple[Any, Any]:
        """Check adapter ``name`` and record its LoRARequest; returns it and, the first time on CPU, the zero
        adapter's request (None otherwise).  AdapterError says what does not fit."""
        rank = self._check(name, directory)
        if rank > self.max_rank:
            raise AdapterError(f"adapter {name!r}: rank {rank} is more than the max_lora_rank {self.max_rank} vLLM "
                               f"was started with for model {self.model!r} (set max_lora_rank: {rank} or more on it)")
        new_zero = None
        with self._lock:
            if self._zero_for_base and self._zero is None:
                self._zero_dir = _write_zero_adapter(directory)
                self._zero = new_zero = self._make_request(ZERO, next(self._ids), str(self._zero_dir))
            lora_id = next(self._ids)
            request = self._make_request(name, lora_id, str(directory))
            self._requests[name] = (lora_id, request)
        return request, new_zero

    def _check(self, name: str, directory: Path) -> int:
        if not directory.is_dir():
            raise AdapterError(f"adapter {name!r}: {directory} is not a directory")
        if self._shapes is None:
            return adapter_rank(directory)
        return read_peft(name, directory, self._shapes).rank

    def unregister(self, name: str) -> int | None:
        """Forget ``name``; its vLLM id (to free vLLM's copy), or None if it was not registered."""
        with self._lock:
            found = self._requests.pop(name, None)
        return None if found is None else found[0]

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._requests)

    def request_for(self, adapter: str | None) -> Any:
        """The LoRARequest a request for ``adapter`` (None: the bare base) carries, or None."""
        with self._lock:
            if adapter is None:
                return self._zero
            found = self._requests.get(adapter)
        return None if found is None else found[1]

    def drop_zero(self) -> None:
        """Forget the zero adapter (vLLM refused it): the next registration makes another."""
        with self._lock:
            self._zero = None
        self.close()

    def close(self) -> None:
        if self._zero_dir is not None:
            shutil.rmtree(self._zero_dir, ignore_errors=True)


def _write_zero_adapter(like: Path) -> Path:
    """A rank-1 PEFT adapter with B = 0 on the first module the adapter in ``like`` targets, in a new temp dir."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(like / "adapter_model.safetensors"))
    a_key = sorted(k for k in tensors if ".lora_A." in k)[0]
    b_key = a_key.replace(".lora_A.", ".lora_B.")
    module = a_key.split(".lora_A.")[0].rsplit(".", 1)[-1]
    target = Path(tempfile.mkdtemp(prefix="inhouse-zero-lora-"))
    config = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": [module], "bias": "none"}
    (target / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    save_file({a_key: torch.zeros(1, tensors[a_key].shape[1]), b_key: torch.zeros(tensors[b_key].shape[0], 1)},
              str(target / "adapter_model.safetensors"))
    return target
