"""``inhouse keys`` argument parsing: an expiry must be a finite time in the future, as in the admin API (issue 8)."""

from __future__ import annotations

import argparse
import time

import pytest

from inhouse.cli.keys import _future


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1.0", "2020-01-01", "1e400"])
def test_an_expiry_that_is_not_in_the_future_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="not a time in the future"):
        _future(text)


def test_a_future_expiry_is_taken() -> None:
    now = time.time()
    assert 30 * 86400 - 60 < _future("30d") - now < 30 * 86400 + 60
    assert _future("2999-01-01") > now
    assert _future(str(int(now) + 3600)) == int(now) + 3600
