"""allocator.py on glibc, in a fresh process each (its settings are the process's): with freed memory kept, tensors
of a few to 30 MB come from the heap, not from fresh mappings that fault every page in again, and a second burst
of them touches few fresh pages; released, the process's resident memory falls."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")

SCRIPT = """
import ctypes, resource, sys, torch
from inhouse.engine.local.allocator import keep_freed_memory, release_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] != "default":
    assert keep_freed_memory()
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
mapped = []  # whether each first tensor of 4, 12 and 28 MB got a mapping of its own
for n in (1_000_000, 3_000_000, 7_000_000):
    before = libc.mallinfo2().hblkhd
    t = torch.ones(n)
    mapped.append(int(libc.mallinfo2().hblkhd - before >= 4 * n))
    del t
def burst():  # a long prompt's step: tensors of 8-28 MB, 170 MB alive at once, then all freed
    for _ in range(3):
        alive = [torch.ones(n) for n in (2_000_000, 7_000_000, 7_000_000, 7_000_000, 7_000_000, 3_000_000)]
        alive.append(alive[1] * 2)
        del alive
burst()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
burst()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
after_burst = resident()
if sys.argv[1] == "release":
    release_freed_memory()
print(*mapped, faults, after_burst, resident())
"""


def run(mode: str) -> list[int]:
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120, check=True)
    return list(map(int, done.stdout.split()))


def test_kept_memory_serves_big_tensors_from_the_heap() -> None:
    """glibc's defaults map each of the first 4, 12 and 28 MB tensors afresh (and unmap it when freed); kept, they
    come from the heap.  The second burst then faults few of its ~150,000 pages in (glibc's defaults: 82,000 in
    five runs of eight, 6,800 in three, as the heap's layout let it trim or not)."""
    assert run("default")[:3] == [1, 1, 1]
    *mapped, faults, _, _ = run("keep")
    assert mapped == [0, 0, 0]
    assert faults < 25_000


def test_released_memory_goes_back_to_the_system() -> None:
    *_, after_burst, now = run("release")
    assert after_burst - now > 100 << 20
