"""What every engine that builds a model from weights shares: where it runs, in which dtype, and the lock.

``pick_device``/``pick_dtype`` turn a spec's ``device``/``dtype`` (``auto`` included) into torch's.  ``auto``
is bf16 where the hardware has it: on this project's CPUs (AVX-512 bf16) SmolLM2 decoded ~2.4× and
all-MiniLM-L6-v2 embedded ~3× faster than in fp32, and MiniLM's vectors kept a cosine > 0.9999 to fp32's.

``WEIGHTS_LOCK``: transformers' ``from_pretrained(dtype=...)`` sets torch's *process-wide* default dtype while
it builds a model and restores it after.  The registry starts every engine at once, each loading in its own
thread, so without this lock a chat model and an embedding model loading together build each other's layers
in the wrong dtype (seen: MiniLM with half its weights bf16, half fp32, failing its first forward pass).
Loads are mostly disk and memory bound, so taking them one at a time costs little.  It is module state
because what it guards, the default dtype, is module state of torch.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["WEIGHTS_LOCK", "pick_device", "pick_dtype"]

WEIGHTS_LOCK = threading.Lock()


def pick_device(wanted: str) -> torch.device:
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(wanted)


def pick_dtype(wanted: str, device: torch.device) -> torch.dtype:
    if wanted != "auto":
        return getattr(torch, wanted)  # type: ignore[no-any-return]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32
