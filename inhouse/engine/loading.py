"""The one lock around building models from weights in this process.

transformers' ``from_pretrained(dtype=...)`` sets torch's *process-wide* default dtype while it builds a model
and restores it after.  The registry starts every engine at once, each loading in its own thread, so without
this lock a chat model and an embedding model loading together build each other's layers in the wrong dtype
(seen: MiniLM with half its weights bf16, half fp32, failing its first forward pass).  Loads are mostly disk
and memory bound, so taking them one at a time costs little.  It is module state because what it guards, the
default dtype, is module state of torch.
"""

from __future__ import annotations

import threading

__all__ = ["WEIGHTS_LOCK"]

WEIGHTS_LOCK = threading.Lock()
