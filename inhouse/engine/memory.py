"""How much memory is free on a device, for the estimates made before anything is loaded.

Owns reading it: ``MemAvailable`` from /proc/meminfo for host memory, or the free memory of the CUDA device.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["available_bytes"]


def available_bytes(device: str = "cpu", meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Free memory where the weights would go, or None when it cannot be told."""
    if device.startswith("cuda") or device == "auto":
        try:
            import torch

            if torch.cuda.is_available():
                index = int(device.split(":")[1]) if ":" in device else 0
                return int(torch.cuda.mem_get_info(index)[0])
        except Exception:  # no torch, no driver: fall back to host memory
            pass
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
