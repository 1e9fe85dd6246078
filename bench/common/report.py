"""A benchmark's report: the table on stdout, PASS/FAIL lines, and a JSON file that starts with ``meta``.

Owns formatting (column widths, adaptive ms/s, signed ms), the ``Check`` of one target, the ``meta`` block
(when, how long, the machine and its load, package versions, where the logs are, how inhouse was run, and
anything the benchmark adds), and where results go: ``bench/results/NAME.json``, or for a ``--smoke`` run a
file in the temporary directory, so that proving a benchmark works never overwrites measured results.
It must not measure or start anything.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SMOKE", "Check", "Started", "add_flags", "add_quiet_flags", "check", "ms", "only", "out_path", "signed_ms",
           "table", "write"]

RESULTS = Path(__file__).resolve().parents[1] / "results"


def table(head: Sequence[str], rows: Sequence[Sequence[str]], title: str | None = None, left: int = 1) -> str:
    """Columns as wide as their widest cell; the first ``left`` left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if i < left else v.rjust(w)
                         for i, (v, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([*([title] if title else []), line(head), "  ".join("-" * w for w in widths), *map(line, rows)])


def ms(seconds: float | None) -> str:
    """Adaptive: ``0.4 ms``, ``63 ms``, ``12.3 s``; ``-`` for nothing."""
    if seconds is None:
        return "-"
    if seconds >= 10:
        return f"{seconds:.1f} s"
    return f"{seconds * 1000:.1f} ms" if seconds < 0.01 else f"{seconds * 1000:.0f} ms"


def signed_ms(value_ms: float | None, digits: int = 3) -> str:
    return "-" if value_ms is None else f"{value_ms:+.{digits}f} ms"


@dataclass(frozen=True)
class Check:
    """One target: what was measured against what bound, and whether it passed (None: not measured)."""

    target: str
    value: float | None
    passed: bool | None
    shown: str  # the measured value as the line prints it
    bound: float | None = None

    @property
    def result(self) -> str:
        return "N/A" if self.passed is None else ("PASS" if self.passed else "FAIL")

    def line(self) -> str:
        return f"{self.result:<4}  {self.target}  (measured {self.shown})"

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "value": self.value, "bound": self.bound, "pass": self.passed,
                "result": self.result}


def check(target: str, value: float | None, ok: Callable[[float], bool],
          fmt: Callable[[float], str] = lambda v: f"{v:.3f}", bound: float | None = None) -> Check:
    """``Check`` of ``value`` (None when it could not be measured)."""
    if value is None:
        return Check(target, None, None, "-", bound)
    return Check(target, value, ok(value), fmt(value), bound)


@dataclass(frozen=True)
class Started:
    """The moment a run started and the machine's load then; ``meta()`` completes the block at the end."""

    at: float = field(default_factory=time.time)
    loadavg: tuple[float, float, float] = field(default_factory=os.getloadavg)

    def meta(self, logs: Path | None = None, **extra: Any) -> dict[str, Any]:
        return {
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.at)),
            "duration_s": time.time() - self.at,
            "cpu_count": os.cpu_count(),
            "loadavg_before": self.loadavg,
            "loadavg_after": os.getloadavg(),
            "python": platform.python_version(),
            "versions": _versions(),
            "logs": str(logs) if logs else None,
            **extra,
        }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "fastapi", "uvicorn", "httpx", "aiohttp", "inhouse"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


SMOKE = "smoke run: the smallest run that proves every contender works; its numbers mean nothing"


def add_flags(parser: argparse.ArgumentParser, name: str) -> None:
    """``--smoke`` and ``--out``, worded the same in every benchmark."""
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest run that proves every contender answers; exit status 1 if one did not. "
                             "Its numbers mean nothing; its JSON goes to the temporary directory")
    parser.add_argument("--out", type=Path, help=f"JSON file (default bench/results/{name}.json)")


def add_quiet_flags(parser: argparse.ArgumentParser, wait_quiet_s: float = 0.0, retries: bool = True) -> None:
    """``--wait-quiet SECONDS`` (and ``--retries N``), worded the same in every benchmark on the shared machine."""
    parser.add_argument("--wait-quiet", type=float, default=wait_quiet_s, metavar="SECONDS",
                        help="before each measurement, wait up to this long for other processes to leave the CPU idle")
    if retries:
        parser.add_argument("--retries", type=int, default=0,
                            help="re-measure up to this many times while other processes kept the CPU busy")


def only(given: str | None, known: Sequence[str], default: Sequence[str] | None = None) -> list[str]:
    """``--only a,b``: the names given, in the order of ``known``; unknown names stop the benchmark."""
    if given is None:
        return list(default if default is not None else known)
    chosen = {k.strip() for k in given.split(",") if k.strip()}
    unknown = sorted(chosen - set(known))
    if unknown:
        raise SystemExit(f"unknown name(s) {unknown}; known: {', '.join(known)}")
    return [k for k in known if k in chosen]


def out_path(name: str, given: Path | None, smoke: bool = False) -> Path:
    """``--out`` if given; else ``bench/results/NAME.json``, or a temporary file for a smoke run."""
    if given is not None:
        return given
    if smoke:
        return Path(tempfile.gettempdir()) / f"inhouse-bench-{name}-smoke.json"
    return RESULTS / f"{name}.json"


def write(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {path}", flush=True)
