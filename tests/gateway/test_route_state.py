"""RouteState, the circuit breaker: N failures within the window open it, a cooldown, then exactly one probe.

Time is real: windows and cooldowns are either tiny (and slept past) or a minute (and never reached), so a
busy machine can only make a sleep longer, never change an outcome.
"""

from __future__ import annotations

import time

from inhouse.gateway.registry import RouteState

LONG = 60.0  # never reached by a test
TINY = 0.02  # always slept past
PAST = 0.1


def test_a_new_route_is_closed_and_available() -> None:
    route = RouteState()
    assert route.circuit == "closed" and route.available()
    route.taken()
    assert not route.probing and route.available()  # a closed circuit takes any number of requests


def test_opens_after_n_failures_within_the_window() -> None:
    route = RouteState()
    assert not route.failed(3, LONG, LONG)
    assert not route.failed(3, LONG, LONG)
    assert route.circuit == "closed" and route.available()
    assert route.failed(3, LONG, LONG)  # the third opens it
    assert route.circuit == "open" and not route.available()
    assert route.open_until > time.monotonic() + LONG / 2


def test_failures_spread_wider_than_the_window_do_not_open_it() -> None:
    route = RouteState()
    for _ in range(4):
        assert not route.failed(2, TINY, LONG)
        time.sleep(PAST)
    assert route.circuit == "closed" and route.available()
    assert len(route.failures) == 1  # the old ones were forgotten


def test_half_open_after_the_cooldown_lets_exactly_one_probe_through() -> None:
    route = RouteState()
    assert route.failed(1, LONG, TINY)
    time.sleep(PAST)
    assert route.circuit == "half_open" and route.available()
    route.taken()  # the router chose it: this request is the probe
    assert route.probing and not route.available()
    assert route.circuit == "half_open"


def test_a_failed_probe_reopens_for_another_cooldown() -> None:
    route = RouteState()
    assert route.failed(1, LONG, TINY)
    time.sleep(PAST)
    route.taken()
    before = time.monotonic()
    assert route.failed(5, LONG, LONG)  # one failed probe is enough, whatever the threshold
    assert route.circuit == "open" and not route.available() and not route.probing
    assert route.open_until >= before + LONG


def test_a_successful_probe_closes_the_circuit() -> None:
    route = RouteState()
    assert route.failed(1, LONG, TINY)
    time.sleep(PAST)
    route.taken()
    route.succeeded()
    assert route.circuit == "closed" and route.available() and not route.probing
    route.taken()
    assert not route.probing


def test_success_forgets_earlier_failures() -> None:
    route = RouteState()
    assert not route.failed(3, LONG, LONG)
    assert not route.failed(3, LONG, LONG)
    route.succeeded()
    assert not route.failed(3, LONG, LONG)
    assert not route.failed(3, LONG, LONG)
    assert route.circuit == "closed"
    assert route.failed(3, LONG, LONG)


def test_opening_clears_the_count_for_after_the_cooldown() -> None:
    route = RouteState()
    assert route.failed(2, LONG, TINY) is False
    assert route.failed(2, LONG, TINY) is True
    assert len(route.failures) == 0


def test_an_unhealthy_route_is_unavailable_whatever_its_circuit() -> None:
    route = RouteState(healthy=False)
    assert route.circuit == "closed" and not route.available()
    route.healthy = True
    assert route.available()
    assert route.failed(1, LONG, TINY)
    time.sleep(PAST)
    route.healthy = False
    assert route.circuit == "half_open" and not route.available()  # no probe to a deployment known down
