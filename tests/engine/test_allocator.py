"""``inhouse.engine.allocator``: with glibc's thresholds set, a process that allocates, touches and frees 16 MiB
tensors over and over (four alive at once, as in a prefill's layer) takes their pages from the kernel once, not
every step as with glibc's default threshold; the environment's own tuning wins."""

from __future__ import annotations

import subprocess
import sys

from inhouse.engine.allocator import keep_freed_memory
from tests.conftest import REPO

CYCLES = """
import ctypes, resource, sys, torch
from inhouse.engine.allocator import keep_freed_memory
# glibc's own default threshold, 128 KiB, set explicitly: glibc otherwise raises it on its own after the first
# big free, sometimes enough that a loop this simple reuses its blocks and sometimes not (it depends on what else
# sits on the heap), which would make the comparison a coin toss
ctypes.CDLL(None).mallopt(-3, 128 * 1024)
if sys.argv[1] == "tuned":
    assert keep_freed_memory({}).startswith("blocks under 32 MiB"), "glibc did not take the thresholds"
def step():  # as a layer of a prefill: several temporaries of megabytes alive at once, then all freed
    held = [torch.ones(4 << 20) for _ in range(4)]  # 16 MiB of float32 each, every page written
    del held
step()  # torch and the first pages are warm
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(int(sys.argv[2])):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
STEPS = 20
PAGES = 4 * (16 << 20) // 4096  # of one step's four tensors


def _page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", CYCLES, mode, str(STEPS)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=True)
    return int(done.stdout.strip())


def test_freed_blocks_are_reused_instead_of_faulted_in_again() -> None:
    plain, tuned = _page_faults("plain"), _page_faults("tuned")
    assert plain > STEPS * PAGES * 0.9  # each block its own mmap: every page from the kernel again, every step
    assert tuned < 3 * PAGES  # the heap's pages, faulted in once (or twice) and reused


def test_an_operators_own_tuning_or_off_switch_wins() -> None:
    assert keep_freed_memory({"MALLOC_TRIM_THRESHOLD_": "0"}) == "left to the environment's MALLOC_*_THRESHOLD_"
    assert keep_freed_memory({"MALLOC_MMAP_THRESHOLD_": "65536"}) == "left to the environment's MALLOC_*_THRESHOLD_"
    assert keep_freed_memory({"INHOUSE_MALLOC_TUNING": "0"}) == "off (INHOUSE_MALLOC_TUNING=0)"
