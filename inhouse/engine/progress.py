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
from functools import partialmethod
from types import TracebackType
from typing import Any, TextIO

__all__ = ["Steps", "quiet_library_bars"]

_BAR = "{desc}: {bar:20} {n_fmt}/{total_fmt} steps [{elapsed}] {postfix}"


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def quiet_library_bars(stream: TextIO | None = None) -> None:
    """Off a terminal, turn off the libraries' own bars (transformers' "Loading weights", its GGUF reader's
    "Converting and de-quantizing", huggingface_hub's): ``Steps`` says the same as log lines, and a bar's
    carriage returns garble a log.  Their environment switches are read when they are imported, which the CLI's
    imports already did, and transformers' GGUF reader calls tqdm directly: so tqdm's own default becomes
    ``disable=True`` for this process (a bar that asks for ``disable=False`` still shows).  On a terminal,
    nothing changes."""
    if _is_terminal(stream if stream is not None else sys.stderr):
        return
    import tqdm
    from huggingface_hub.utils.tqdm import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    disable_progress_bars()
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    init = tqdm.tqdm.__dict__["__init__"]
    if getattr(init, "keywords", {}).get("disable") is not True:  # tqdm's own __init__ is a partialmethod too
        tqdm.tqdm.__init__ = partialmethod(tqdm.tqdm.__init__, disable=True)


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
        return _is_terminal(self.stream)

    def __enter__(self) -> Steps:
        self._start = time.monotonic()
        if self.on_terminal:
            from tqdm import tqdm

            self._bar = tqdm(total=len(self.steps), desc=self.job, unit="step", file=self.stream, leave=True,
                             disable=False, bar_format=_BAR)
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
