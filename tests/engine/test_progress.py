"""``Steps``: a tqdm bar on a terminal, plain log lines elsewhere, and a failed step said as such."""

from __future__ import annotations

import io
import logging

import pytest

from inhouse.engine.progress import Steps

log = logging.getLogger("inhouse.test.progress")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_when_not_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()
    with caplog.at_level(logging.INFO, logger=log.name), Steps("converting x.gguf", ("a", "b", "c"), log,
                                                               stream) as steps:
        steps.step("a")
        steps.step("b")
        steps.step("c")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:3] == [f"converting x.gguf: step {i}/3 {name}" for i, name in ((1, "a"), (2, "b"), (3, "c"))]
    assert lines[3].startswith("converting x.gguf: done in ")
    assert stream.getvalue() == "" and steps.done == 3


def test_a_bar_on_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    stream = Terminal()
    with caplog.at_level(logging.INFO, logger=log.name), Steps("loading m", ("tokenizer", "weights"), log,
                                                               stream) as steps:
        steps.step("tokenizer")
        steps.step("weights")
    out = stream.getvalue()
    assert "loading m" in out and "2/2 steps" in out and "done" in out
    assert not caplog.records  # the bar says it; no log lines beside it


def test_a_failure_names_the_step(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=log.name), pytest.raises(OSError), \
            Steps("loading m", ("tokenizer", "weights"), log, io.StringIO()) as steps:
        steps.step("tokenizer")
        steps.step("weights")
        raise OSError("disk")
    assert caplog.records[-1].getMessage().startswith("loading m: failed at step weights after ")
    assert steps.done == 1
