"""Progress of a long job made of named steps (a GGUF conversion, loading a model): a bar or log lines.

Owns the choice of how progress is shown: a tqdm bar on ``stream`` (stderr) when it is a terminal, else one
plain log line per step and one at the end, so a log collector sees ``converting x.gguf: step 2/4 dequantize``
instead of carriage returns.  Holds no state beyond the one job it reports on.

    with Steps("converting x.gguf", ("tokenizer", "dequantize", "save"), log) as steps:
        steps.step("tokenizer")
        ...
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any, TextIO

__all__ = ["Steps"]


class Steps:
    """One job's steps, announced in order; a bar on a terminal, log lines otherwise."""

    def __init__(self, job: str, steps: Sequence[str], log: logging.Logger, stream: TextIO | None = None) -> None:
        self.job = job
        self.steps = tuple(steps)
        self.log = log
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self._current: str | None = None
        self._bar: Any = None
        self._start = 0.0

    @property
    def on_terminal(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def __enter__(self) -> Steps:
        self._start = time.monotonic()
        if self.on_terminal:
            from tqdm import tqdm

            self._bar = tqdm(total=len(self.steps), desc=self.job, unit="step", file=self.stream, leave=True,
                             bar_format="{desc}: {bar:20} {n_fmt}/{total_fmt} steps [{elapsed}] {postfix}")
        return self

    def step(self, name: str) -> None:
        """``name`` starts (the step before it is done)."""
        if self._current is not None:
            self._advance()
        self._current = name
        number = min(self.done + 1, len(self.steps))
        if self._bar is not None:
            self._bar.set_postfix_str(name)
        else:
            self.log.info("%s: step %d/%d %s", self.job, number, len(self.steps), name)

    def _advance(self) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        elapsed = time.monotonic() - self._start
        if kind is None and self._current is not None:
            self._advance()
        if self._bar is not None:
            self._bar.set_postfix_str("done" if kind is None else f"failed at {self._current}")
            self._bar.close()
        elif kind is None:
            self.log.info("%s: done in %.1f s", self.job, elapsed)
        else:
            self.log.info("%s: failed at step %s after %.1f s", self.job, self._current, elapsed)
