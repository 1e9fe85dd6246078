"""``inhouse bench``'s load: the closed loop keeps N in flight, samples and summaries count what happened, and the
in-process sender drives a real (fake) engine."""

from __future__ import annotations

import asyncio

from inhouse.cli.bench_load import Sample, closed_loop, engine_sender, percentile, summarize
from inhouse.config import FakeSpec, model_spec
from inhouse.engine.fake import FakeEngine


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([], 50) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert percentile([float(i) for i in range(101)], 99) == 99.0


async def test_closed_loop_keeps_concurrency_in_flight_and_sends_each_request_once() -> None:
    in_flight, peak, seen = 0, 0, []

    async def send(i: int) -> Sample:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        seen.append(i)
        return Sample(ttft_s=0.001, latency_s=0.01, output_tokens=2)

    samples, wall = await closed_loop(send, 9, 3)
    assert sorted(seen) == list(range(9)) and len(samples) == 9 and peak == 3 and wall > 0


def test_summary_counts_tokens_of_successes_and_keeps_the_first_error() -> None:
    samples = [Sample(ttft_s=0.1, latency_s=1.0, gaps_s=[0.01, 0.03], output_tokens=3),
               Sample(ttft_s=0.3, latency_s=2.0, gaps_s=[0.02], output_tokens=2),
               Sample(error="HTTP 429: busy")]
    level = summarize(2, samples, 2.0)
    assert (level.requests, level.errors, level.output_tokens, level.tokens_per_s) == (3, 1, 5, 2.5)
    assert level.ttft_p50_ms == 200.0 and level.itl_p50_ms == 20.0 and level.first_error == "HTTP 429: busy"


async def test_engine_sender_measures_a_fake_engine() -> None:
    spec = model_spec(name="f", engine="fake", fake_reply="one two three four five six")
    assert isinstance(spec, FakeSpec)
    engine = FakeEngine(spec)
    await engine.start()
    try:
        samples, wall = await closed_loop(engine_sender(engine, 4, ignore_eos=True), 6, 2)
    finally:
        await engine.close()
    level = summarize(2, samples, wall)
    assert level.errors == 0 and level.output_tokens == 6 * 4 and level.ttft_p50_ms is not None


async def test_engine_sender_reports_a_failing_engine_as_errors() -> None:
    spec = model_spec(name="f", engine="fake", fake_reply="one two three", fake_fail_after=1)
    assert isinstance(spec, FakeSpec)
    engine = FakeEngine(spec)
    await engine.start()
    try:
        samples, _ = await closed_loop(engine_sender(engine, 3, ignore_eos=True), 2, 1)
    finally:
        await engine.close()
    assert all(s.error is not None and "engine_error" in s.error for s in samples)
