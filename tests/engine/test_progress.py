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


def test_library_bars_are_turned_off_in_a_log_only() -> None:
    import tqdm
    from huggingface_hub.utils.tqdm import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    from inhouse.engine.progress import quiet_library_bars

    original = tqdm.tqdm.__dict__["__init__"]
    try:
        quiet_library_bars(Terminal())
        assert transformers_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
        quiet_library_bars(io.StringIO())
        quiet_library_bars(io.StringIO())  # twice: still one wrapper
        assert not transformers_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
        out = io.StringIO()
        for _ in tqdm.tqdm(range(3), file=out, desc="library bar"):
            pass
        assert out.getvalue() == ""
        with Steps("ours", ("a",), log, Terminal()) as steps:  # a terminal's bar still shows
            steps.step("a")
            assert steps._bar is not None and not steps._bar.disable
    finally:
        tqdm.tqdm.__init__ = original  # type: ignore[method-assign]
        transformers_logging.enable_progress_bar()
        enable_progress_bars()
