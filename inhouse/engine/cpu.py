"""What this machine's CPU can do, as /proc/cpuinfo says: the engines' choices of kernels and dtypes read it."""

from __future__ import annotations

from pathlib import Path

__all__ = ["cpu_has"]


def cpu_has(flag: str) -> bool:
    """Whether /proc/cpuinfo lists ``flag`` (False where there is none to read)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return any(line.startswith("flags") and flag in line.split() for line in text.splitlines())
