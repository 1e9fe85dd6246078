"""``bench/common``'s pieces that ``bench/workload.py`` added: Poisson arrivals and the open loop, the tree's peak
RSS, ``/metrics`` counters and the prefix-cache hit rate, the corpus chunker, the shared flags."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
from pathlib import Path

import pytest

from bench.common import corpus, load, machine, report, scrape


def test_poisson_arrivals_are_seeded_increasing_and_near_the_rate() -> None:
    arrivals = load.poisson_arrivals(2000, 4.0, seed=7)
    assert arrivals == load.poisson_arrivals(2000, 4.0, seed=7) != load.poisson_arrivals(2000, 4.0, seed=8)
    assert arrivals[0] == 0.0 and all(b > a for a, b in itertools.pairwise(arrivals))
    assert 3.5 < len(arrivals) / arrivals[-1] < 4.5


async def test_open_loop_starts_jobs_on_time_whether_or_not_earlier_ones_ended() -> None:
    in_flight, peak = 0, 0

    async def job(i: int) -> int:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.3)
        in_flight -= 1
        return i

    results, wall = await load.open_loop(job, [0.0, 0.01, 0.02, 0.03])
    assert results == [0, 1, 2, 3] and peak == 4 and wall >= 0.3


async def test_open_loop_cut_short_leaves_none_for_what_did_not_finish() -> None:
    async def job(i: int) -> int:
        await asyncio.sleep(0.0 if i == 0 else 30.0)
        return i

    results, _ = await load.open_loop(job, [0.0, 0.0], timeout_s=0.5)
    assert results == [0, None]


def test_summary_has_the_inter_token_p99() -> None:
    run = load.Run([load.Sample(ttft_s=0.1, latency_s=1.0, gaps_s=[0.01] * 99 + [1.0], output_tokens=101)], 1.0)
    level = load.summarize(1, run)
    assert level.itl_p50_s == pytest.approx(0.01) and level.itl_p99_s is not None and level.itl_p99_s > 0.01


def test_peak_rss_of_this_process_tree() -> None:
    with machine.PeakRss(os.getpid(), every_s=0.01) as rss:
        ballast = bytearray(64 << 20)
        ballast[::4096] = b"x" * len(ballast[::4096])
        asyncio.run(asyncio.sleep(0.1))
    assert rss.peak is not None and rss.peak >= 64 << 20
    assert machine.tree_rss(2**22 + 12345) is None  # no such process


METRICS = """# HELP vllm:prefix_cache_queries Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 250.0
vllm:prefix_cache_hits_created{engine="0",model_name="m"} 1.7e9
inhouse_requests_total{route="chat"} 3
"""


def test_hit_rate_is_the_share_of_queried_tokens_served_between_two_reads() -> None:
    before = scrape.parse(METRICS)
    after = scrape.parse(METRICS.replace("1000.0", "3000.0").replace("250.0", "1250.0"))
    assert before["inhouse_requests_total"] == 3
    assert scrape.hit_rate(before, after) == pytest.approx(0.5)
    assert scrape.hit_rate(before, before) is None  # nothing asked
    other = scrape.parse("inhouse_requests_total 3\n")
    assert scrape.hit_rate(other, other) is None  # no prefix-cache counters
    assert scrape.hit_rate(None, after) is None
    inhouse = "inhouse_prefix_cache_hits_total 10\ninhouse_prefix_cache_queries_total 40\n"
    assert scrape.hit_rate(scrape.parse(""), scrape.parse(inhouse)) is None  # counters appeared: no baseline
    assert scrape.hit_rate(scrape.parse(inhouse.replace("10", "0").replace("40", "0")),
                           scrape.parse(inhouse)) == pytest.approx(0.25)
    # inhouse's own names: hit and missed prompt tokens (queries = both)
    ours = 'inhouse_engine_prefix_cache_hit_tokens_total{model="m"} 300\n' \
           'inhouse_engine_prefix_cache_miss_tokens_total{model="m"} 100\n'
    start = 'inhouse_engine_prefix_cache_hit_tokens_total{model="m"} 0\n' \
            'inhouse_engine_prefix_cache_miss_tokens_total{model="m"} 0\n'
    assert scrape.hit_rate(scrape.parse(start), scrape.parse(ours)) == pytest.approx(0.75)


def test_chunks_pack_whole_sentences_under_the_budget(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("# comment\nOne two three. Four five.\nSix seven eight nine.\n\nTen eleven. Twelve.\n")
    words = lambda text: len(text.split())  # noqa: E731
    chunks = corpus.chunks(path, words, " ", max_tokens=5)
    assert chunks == ["One two three. Four five.", "Six seven eight nine.", "Ten eleven. Twelve."]


def test_only_keeps_known_order_and_refuses_unknown_names() -> None:
    assert report.only(None, ["a", "b", "c"], ["b"]) == ["b"]
    assert report.only("c,a", ["a", "b", "c"]) == ["a", "c"]
    with pytest.raises(SystemExit):
        report.only("a,zz", ["a", "b"])
    parser = argparse.ArgumentParser()
    report.add_quiet_flags(parser, wait_quiet_s=5.0, retries=False)
    assert parser.parse_args([]).wait_quiet == 5.0 and not hasattr(parser.parse_args([]), "retries")
