"""The canary verdict (``judge``) and the tally it reads: thresholds, too few requests, what counts as an error."""

from __future__ import annotations

from inhouse.config import SwapSettings
from inhouse.gateway.canary import Tally, failing, judge

RULES = SwapSettings(canary_min_requests=5, canary_max_error_rate_delta=0.05, canary_max_ttft_ratio=2.0,
                     canary_ttft_slack_ms=50)


def tally(requests: int, errors: int = 0, ttft: float = 100.0) -> Tally:
    t = Tally()
    for i in range(requests):
        t.add(500 if i < errors else 200, None, ttft)
    return t


def test_a_healthy_canary_is_promoted() -> None:
    verdict = judge(tally(20), tally(100), RULES)
    assert verdict.promote, verdict.reason


def test_too_few_canary_requests_roll_back() -> None:
    verdict = judge(tally(4), tally(100), RULES)
    assert not verdict.promote
    assert "too few" in verdict.reason


def test_a_higher_error_rate_rolls_back_and_the_old_rate_is_the_baseline() -> None:
    assert not judge(tally(20, errors=2), tally(100), RULES).promote  # 10% against 0%
    assert judge(tally(20, errors=2), tally(100, errors=8), RULES).promote  # 10% against 8%: within 5 points


def test_a_slower_p99_ttft_rolls_back_but_milliseconds_of_noise_do_not() -> None:
    slow = judge(tally(20, ttft=500), tally(100, ttft=100), RULES)
    assert not slow.promote and "TTFT" in slow.reason
    assert judge(tally(20, ttft=30), tally(100, ttft=5), RULES).promote  # 6x, but within the 50 ms slack


def test_stream_errors_count_and_client_errors_do_not() -> None:
    t = Tally()
    t.add(200, "engine_error", 10)  # a stream that failed after its first byte
    t.add(400, "invalid_request", None)
    t.add(200, "client_disconnected", None)
    t.add(200, None, 30)
    assert (t.requests, t.errors) == (4, 1)
    assert t.p99_ttft == 30


def test_a_canary_is_failing_early_only_on_enough_requests_and_only_by_its_error_rate() -> None:
    assert not failing(tally(4, errors=4), tally(10), RULES)  # too few to say
    assert failing(tally(5, errors=5), tally(10), RULES)
    assert not failing(tally(20, errors=2), tally(100, errors=8), RULES)  # within 5 points of the old rate
    assert not failing(tally(20, ttft=10_000), tally(100), RULES)  # a slow canary waits for the window's verdict
