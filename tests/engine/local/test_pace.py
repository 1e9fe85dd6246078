"""The pace of chunked prefill (``Pace``): what it learns a prompt token and a query-key pair cost from the steps it
is told about, and the prompt tokens it then lets a step take beside the decoding streams."""

from __future__ import annotations

import pytest

from inhouse.engine.local.pace import Pace

# a made-up model: seconds a decode step, any prompt beside it, a prompt token, a query-key pair
DECODE, FIXED, TOKEN, PAIR = 0.020, 0.004, 5e-4, 2e-7


def pairs(n: int, offset: int) -> float:
    return n * (offset + n / 2)


def excess(n: int, offset: int) -> float:
    return FIXED + TOKEN * n + PAIR * pairs(n, offset)


def feed(pace: Pace, decode_rows: int = 4) -> None:
    """Tell ``pace`` of steps of the made-up model, at several chunk sizes and offsets."""
    for n, offset in [(16, 0), (64, 500), (32, 3000), (128, 1000), (16, 2000), (200, 0), (48, 1500)] * 3:
        pace.ran(DECODE, decode_rows, 0)
        pace.ran(DECODE + excess(n, offset), decode_rows, n, pairs(n, offset))


def fed(most: int = 4096) -> Pace:
    pace = Pace(most)
    feed(pace)
    return pace


def test_it_learns_what_a_prompt_a_token_and_a_pair_add_to_a_step() -> None:
    pace = fed()
    assert pace.decode_s == pytest.approx(DECODE)
    assert pace.fixed_s == pytest.approx(FIXED, rel=0.1)
    assert pace.token_s == pytest.approx(TOKEN, rel=0.05)
    assert pace.pair_s == pytest.approx(PAIR, rel=0.05)


def test_no_cost_comes_out_below_zero() -> None:
    pace = Pace(512)
    for n in (16, 64, 256, 16, 64, 256):  # steps that cost less the more tokens they take: noise, not a model
        pace.ran(DECODE, 4, 0)
        pace.ran(DECODE + 0.05 - 1e-4 * n, 4, n, pairs(n, 0))
    assert min(pace.fixed_s, pace.token_s, pace.pair_s) >= 0 and pace.fixed_s > 0.01


@pytest.mark.parametrize("offset", [0, 1000, 3000])
def test_a_chunk_adds_what_the_stall_allows_however_far_into_its_prompt(offset: int) -> None:
    pace = fed()
    n = pace.budget(4, offset)
    assert excess(n, offset) <= 1.5 * DECODE * 1.02 < excess(n + 1, offset) * 1.02
    assert pace.budget(4, 3000) < pace.budget(4, 1000) < pace.budget(4, 0)  # far in, each token reads more keys


def test_the_streams_share_the_stall() -> None:
    """Six decode steps' time in all, never less than 1 each: three streams may be held 2, four 1.5, six or more 1."""
    pace = fed()
    budgets = [pace.budget(streams) for streams in (8, 6, 4, 3)]
    assert budgets[0] == budgets[1] < budgets[2] < budgets[3]
    for streams, stall in ((8, 1.0), (6, 1.0), (5, 1.2), (4, 1.5), (3, 2.0)):
        n = pace.budget(streams)
        assert excess(n, 0) <= stall * DECODE * 1.02 < excess(n + 1, 0) * 1.02


def test_more_prompts_waiting_than_streams_decoding_take_a_whole_chunk() -> None:
    """A burst of arrivals beside a few streams: the waiting are the majority, and each waits a whole step."""
    pace = fed(most=512)
    pace.wait = 0.1
    assert pace.budget(6, waiting=6) == pace.budget(6) < 512
    assert pace.budget(6, waiting=7) == 512
    assert pace.budget(6, 3000, tokens=100, pairs=pairs(100, 0), waiting=7) == 412


@pytest.mark.parametrize("streams", [1, 2])
def test_one_or_two_streams_wait_a_whole_chunk(streams: int) -> None:
    """A RAG app's few users: a chunk of ``most`` tokens, whatever it costs them and however far in (six decode
    steps' time would have allowed a fraction of it), less what prompts already in the step take."""
    pace = fed(most=512)
    pace.wait = 0.1  # 512 tokens take longer than that here
    assert pace.budget(streams, 3000) == pace.budget(streams) == 512
    assert excess(512, 3000) > 6 * DECODE  # more than the shared stall would have let them wait
    assert pace.budget(streams, 3000, tokens=100, pairs=pairs(100, 0)) == 412
    assert pace.budget(streams, 0, tokens=500, pairs=pairs(500, 0)) == 0  # no room for the least: the chunk waits
    assert Pace(512).budget(streams) == 512  # no step timed yet: the same
    assert pace.budget(3) < 512


@pytest.mark.parametrize("streams", [1, 2])
def test_on_a_fast_machine_few_streams_wait_as_long_for_a_bigger_chunk(streams: int) -> None:
    """Where more than ``most`` tokens fit ``wait`` seconds of a step, the chunk is what fits (up to twice ``most``);
    far into a prompt, where fewer fit, still ``most``."""
    pace = fed(most=512)  # wait: 0.4 s
    pace.most = 400  # what fits the wait (~660) stays under twice it
    n = pace.budget(streams)
    assert n > 512 and DECODE + excess(n, 0) == pytest.approx(0.4, abs=0.005)  # the wait, filled
    assert pace.budget(streams, 3000) == 400
    assert pace.budget(streams, 0, tokens=100, pairs=pairs(100, 0)) < n
    assert fed(most=128).budget(streams) == 2 * 128


def test_prompt_tokens_already_in_the_step_leave_less_and_the_budget_keeps_its_bounds() -> None:
    pace = fed(most=100)
    assert pace.budget(4, 500, tokens=20, pairs=pairs(20, 0)) < pace.budget(4, 500)
    assert pace.budget(4, 500, tokens=60, pairs=pairs(60, 0)) == 0  # no room left beside them: the chunk waits
    assert pace.budget(4, 50_000) == 16  # alone, however far in, it goes on by the least
    assert fed(most=60).budget(3) == 60  # never above the chunk size
    assert fed(most=60).budget(3, tokens=20, pairs=pairs(20, 0)) == 40  # ... in all


def test_before_a_decode_step_is_timed_it_takes_the_least_and_prompts_alone_teach_it_nothing() -> None:
    pace = Pace(512)
    assert pace.budget(3) == 16
    assert pace.budget(3, tokens=10) == 0  # the least in all: no room for the least beside 10 tokens
    assert pace.room(3, tokens=10) == 6  # but room for a 6-token prompt whole
    pace.ran(1.0, 0, 2000, pairs(2000, 0))  # a prompt alone pays the weights' read too: not a prompt's excess
    pace.ran(DECODE, 4, 0)
    assert (pace.fixed_s, pace.token_s, pace.pair_s) == (0.0, 1e-3, 1e-6)
