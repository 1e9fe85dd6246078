"""How busy the machine was while something was measured, from Linux ``/proc``.

Owns the CPU readings every benchmark needs on a shared 2-core machine (where PyTorch slows down 10-80x when
another process takes a core): cores used by *other* processes between two snapshots, the CPU time and RSS
of a process or of a server's whole process tree (``PeakRss``: its peak while something runs), waiting for an
idle machine, and re-measuring a level that others disturbed.  Elsewhere than Linux every reading is None and
waits return at once.  It must not know what is measured: attempts are callables returning anything with
``others_cores`` and ``attempts``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

__all__ = ["BUSY_CORES", "CpuSnapshot", "PeakRss", "cpu_snapshot", "least_disturbed", "others_cores",
           "process_stats", "tree_rss", "wait_for_quiet"]

BUSY_CORES = 0.1  # cores used by other processes during a measurement above which its numbers are suspect


@dataclass(frozen=True)
class CpuSnapshot:
    at: float
    busy_s: float  # all CPUs, every process
    own_s: float  # this process, its reaped children and the process trees it was asked about


def cpu_snapshot(*roots: int) -> CpuSnapshot | None:
    """Busy CPU seconds machine-wide, and of this run's own processes: itself plus the trees under ``roots``."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:9]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields)
        own_ticks = sum(_tree_ticks(root) for root in roots)
    except (OSError, ValueError, IndexError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    t = os.times()
    return CpuSnapshot(time.monotonic(), (user + nice + system + irq + softirq + steal) / tick,
                       own_ticks / tick + t.user + t.system + t.children_user + t.children_system)


def others_cores(before: CpuSnapshot | None, after: CpuSnapshot | None) -> float | None:
    """Cores kept busy between the snapshots by processes outside this run (0 to the core count)."""
    if before is None or after is None or after.at <= before.at:
        return None
    foreign = (after.busy_s - before.busy_s) - (after.own_s - before.own_s)
    return max(foreign, 0.0) / (after.at - before.at)


def process_stats(pid: int) -> tuple[float, int]:
    """(CPU seconds, RSS bytes) of one process."""
    fields = _stat_fields(Path(f"/proc/{pid}/stat").read_text())
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[21]) * os.sysconf("SC_PAGE_SIZE")


def _stat_fields(stat: str) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name: state, ppid, pgrp, session, ..."""
    return stat[stat.rindex(")") + 2:].split()


def tree_rss(root: int) -> int | None:
    """Resident bytes of ``root`` and every live descendant (None when ``root`` is gone or there is no /proc).

    Pages shared between the processes (vLLM's engine core maps what the server mapped) count once per process.
    """
    pages = _tree_sum(root, lambda fields: int(fields[21]))
    return None if pages is None else pages * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """The largest ``tree_rss(root)`` seen, sampled every ``every_s`` on a thread while the block runs."""

    def __init__(self, root: int, every_s: float = 0.25) -> None:
        self.root, self.every_s = root, every_s
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)

    def _sample(self) -> None:
        while True:
            now = tree_rss(self.root)
            if now is not None and (self.peak is None or now > self.peak):
                self.peak = now
            if self._stop.wait(self.every_s):
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _tree_ticks(root: int) -> int:
    """CPU ticks of ``root`` and every live descendant (vLLM's engine core is a child of the server)."""
    return _tree_sum(root, lambda fields: int(fields[11]) + int(fields[12])) or 0


def _tree_sum(root: int, value: Callable[[list[str]], int]) -> int | None:
    """``value(stat fields)`` summed over ``root`` and its live descendants; None when ``root`` is not running."""
    values: dict[int, int] = {}
    children: dict[int, list[int]] = {}
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = _stat_fields(stat_path.read_text())
            pid = int(stat_path.parent.name)
            values[pid] = value(fields)
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(pid)
    if root not in values:
        return None
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += values.get(pid, 0)
        todo += children.get(pid, [])
    return total


def wait_for_quiet(max_wait_s: float, threshold_cores: float = 0.3, sample_s: float = 3.0) -> None:
    """Before a measurement, wait up to ``max_wait_s`` for other processes to leave the CPU idle."""
    start = time.monotonic()
    while max_wait_s > 0:
        before = cpu_snapshot()
        time.sleep(sample_s)
        busy = others_cores(before, cpu_snapshot())
        if busy is None or busy < threshold_cores:
            break
        if time.monotonic() - start > max_wait_s:
            print(f"  (machine still busy after {max_wait_s:.0f}s: {busy:.2f} cores used by others; measuring anyway)",
                  flush=True)
            return
    waited = time.monotonic() - start
    if waited > 2 * sample_s:
        print(f"  (waited {waited:.0f}s for a quiet machine)", flush=True)


class Disturbable(Protocol):
    others_cores: float | None
    attempts: int


M = TypeVar("M", bound=Disturbable)


def least_disturbed(attempt: Callable[[], M], retries: int, quiet_wait_s: float,
                    say: Callable[[M], None] = lambda _m: None) -> M:
    """Measure; while other processes disturbed it and retries remain, wait for quiet and measure again.

    Keeps the attempt that others disturbed least, with the number of attempts made in its ``attempts``.
    """
    best: M | None = None
    for n in range(1 + retries):
        wait_for_quiet(quiet_wait_s)
        measured = attempt()
        measured.attempts = n + 1
        say(measured)
        if best is None or (measured.others_cores or 0.0) < (best.others_cores or 0.0):
            best = measured
        if (measured.others_cores or 0.0) <= BUSY_CORES:
            break
    assert best is not None
    best.attempts = n + 1
    return best
