"""Cancellation, queue bounds (429 + Retry-After) and keep-alive, on SmolLM2 through the real CLI.

A dedicated server runs at most 2 sequences with 1 waiting, so the limits are reached with few requests.
Runs on both engines: with vLLM, the running/waiting counts and KV use come from vLLM's own scheduler,
so an abort is seen leaving vLLM itself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ENGINES, SMOL, python_for
from tests.e2e.helpers import assert_error, parse_sse
from tests.process import ServerProcess

pytestmark = pytest.mark.slow

LONG = {"model": SMOL, "max_tokens": 4000, "ignore_eos": True,
        "messages": [{"role": "user", "content": "Count from one to ten thousand."}]}


@pytest.fixture(scope="module", params=ENGINES)
def small_server(request: pytest.FixtureRequest, cache_dir: Path, logs_dir: Path) -> Iterator[ServerProcess]:
    engine = request.param
    args = ["--engine", engine, "--max-num-seqs", "2", "--max-waiting", "1", "--keepalive", "0.3"]
    with ServerProcess(args, cache_dir, logs_dir / f"small-{engine}.log", ready_timeout=600,
                       python=python_for(request, engine)) as server:
        yield server


@pytest.fixture
def http(small_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=small_server.url, timeout=60) as c:
        yield c
    wait_idle(small_server)


def engine_stats(server: ServerProcess) -> dict[str, int]:
    """The model's entry in /health: state, running, waiting, kv_cache_tokens."""
    return httpx.get(server.url + "/health", timeout=5).json()["models"][SMOL]


def wait_for(condition, what: str, within: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def admitted(server: ServerProcess) -> int:
    stats = engine_stats(server)
    return stats["running"] + stats["waiting"]


def wait_idle(server: ServerProcess, within: float = 5.0) -> float:
    """Seconds until nothing runs or waits; fails after ``within``."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        stats = engine_stats(server)
        if stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_cache_tokens"] == 0:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"engine still busy after {within}s: {engine_stats(server)}")


def test_stream_disconnect_frees_the_sequence(small_server: ServerProcess, http: httpx.Client) -> None:
    with http.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as r:
        lines = r.iter_lines()  # kept referenced: a dropped httpx line iterator closes the connection
        chunks = 0
        while chunks < 4:
            chunks += next(lines).startswith("data: {")
        # still connected: the sequence keeps running
        time.sleep(0.5)
        assert engine_stats(small_server)["running"] == 1
    # 4000 tokens would take minutes; the sequence must leave the batch right after the disconnect
    assert wait_idle(small_server, within=3.0) < 3.0


def test_blocking_disconnect_frees_the_sequence(small_server: ServerProcess) -> None:
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=small_server.url, timeout=1.5) as c:
        c.post("/v1/chat/completions", json=LONG)
    assert wait_idle(small_server, within=3.0) < 3.0


def test_queue_full_gets_429_with_retry_after_and_waiters_get_keepalives(
    small_server: ServerProcess, http: httpx.Client
) -> None:
    stop = threading.Event()
    raw_of_waiter: list[bytes] = []

    def long_stream(keep: bool) -> None:
        with httpx.Client(base_url=small_server.url, timeout=60) as c, \
                c.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as r:
            buffer = b""
            for chunk in r.iter_raw():
                buffer += chunk
                if stop.is_set():
                    break
            if keep:
                raw_of_waiter.append(buffer)

    threads = [threading.Thread(target=long_stream, args=(i == 2,)) for i in range(3)]
    for i, t in enumerate(threads):
        t.start()
        wait_for(lambda n=i + 1: admitted(small_server) >= n, "the request to be admitted")
    stats = engine_stats(small_server)
    assert (stats["running"], stats["waiting"]) == (2, 1)
    assert stats["kv_cache_tokens"] > 2 * 30, "two running sequences hold their prompts and outputs"
    time.sleep(1.0)  # the waiter sits in the queue for a while: keep-alives flow meanwhile

    refused = http.post("/v1/chat/completions", json={**LONG, "max_tokens": 5})
    assert_error(refused, 429, "queue_full")
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert int(refused.headers["retry-after"]) >= 1

    stop.set()
    for t in threads:
        t.join(30)
    assert raw_of_waiter, "the waiting stream ended without output"
    events, comments, _ = parse_sse(raw_of_waiter[0][: raw_of_waiter[0].rfind(b"\n\n") + 2])
    assert comments >= 2, "a queued stream must receive keep-alive comments"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
