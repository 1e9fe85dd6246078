"""Whether a new version's weights fit beside the old ones, decided before anything is loaded.

Owns the estimate: the weight files' size on disk against the memory the new version would load into
(``MemAvailable`` from /proc/meminfo, or the free memory of the CUDA device when the spec runs on one).
A swap holds two copies of the weights for a moment: the old version keeps serving while the new loads.
"""

from __future__ import annotations

from inhouse.config import ModelSpec
from inhouse.engine.memory import available_bytes
from inhouse.gateway.version import weights_bytes

__all__ = ["HEADROOM", "memory_refusal"]

_GIB = 1024**3
HEADROOM = 1.10  # activations, KV cache and allocator slack on top of the weights, at least


def memory_refusal(specs: list[ModelSpec]) -> str | None:
    """None when the new version's weights fit, else the refusal with the numbers."""
    need = int(sum(weights_bytes(spec) for spec in specs) * HEADROOM)
    if need == 0:
        return None
    available = available_bytes(str(getattr(specs[0], "device", "cpu")))
    if available is None or need <= available:
        return None
    return (f"not enough memory for the new version beside the old one: its weights need about "
            f"{need / _GIB:.2f} GiB (weight files × {HEADROOM:g}) and {available / _GIB:.2f} GiB is available")
