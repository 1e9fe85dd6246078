"""The closed-loop load generator and what it measures per request.

Owns sending requests and timing them: latency for any request; for a streaming chat request also the time
to the first content chunk (TTFT), the gaps between content chunks (ITL) and the output tokens, from
``usage`` when the server sends it, else counted as content chunks.  The loop is closed: ``concurrency``
clients, each sending its next request when its previous one ended, until ``count`` requests were sent, the
level's ``duration_s`` passed (no request starts after it) or its time ran out.  ``open_loop`` is the other
kind: each job starts at its own arrival time (``poisson_arrivals``), however many are still running.
httpx by default; aiohttp (``run_aiohttp``, ``run_posts``) where the load generator's own CPU must stay
small.  A failed request never raises: its ``Sample.error`` says why, and ``Run.check`` turns failures into
one exception when a benchmark wants that.  It must not print, start servers or know a contender.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import httpx

from inhouse.cli.bench_load import percentile  # one definition, shared with `inhouse bench`

__all__ = ["CHAT", "Level", "LoadError", "Run", "Sample", "chat_stream", "closed_loop", "open_loop", "percentile",
           "poisson_arrivals", "request", "run", "run_aiohttp", "run_posts", "summarize"]

CHAT = "/v1/chat/completions"
T = TypeVar("T")
NOT_RUN = "not run (level timed out)"


class LoadError(RuntimeError):
    """Requests of a run failed where the benchmark needs every one to succeed."""


@dataclass
class Sample:
    """One request: how long it took and, for a chat stream, its first content, gaps, output tokens, the answer's
    text and how it finished."""

    latency_s: float | None = None
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    tokens_from: str = "chunks"  # "usage" when the server reported completion_tokens, "exact" when known
    error: str | None = None
    content: str = ""
    finish_reason: str | None = None


@dataclass
class Run:
    """The samples of one closed loop, in request order, and its wall time."""

    samples: list[Sample]
    wall_s: float

    @property
    def errors(self) -> list[str]:
        return [s.error for s in self.samples if s.error is not None]

    def latencies_ms(self) -> list[float]:
        return [s.latency_s * 1000 for s in self.samples if s.error is None and s.latency_s is not None]

    def check(self, what: str) -> Run:
        """This run, or ``LoadError`` naming the first failure."""
        if self.errors:
            raise LoadError(f"{what}: {len(self.errors)} of {len(self.samples)} requests failed, "
                            f"first: {self.errors[0]}")
        return self


# ---------------------------------------------------------------------------------------------- one request


async def chat_stream(client: httpx.AsyncClient, body: dict[str, Any], path: str = CHAT) -> Sample:
    """Send one streaming chat request; time the first content chunk and the gaps between content chunks."""
    sample = Sample()
    start = time.perf_counter()
    last: float | None = None
    chunks = 0
    parts: list[str] = []
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                sample.error = f"HTTP {response.status_code}: {text[:300]}"
                return sample
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    sample.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
                    return sample
                now = time.perf_counter()
                choices = chunk.get("choices") or []
                content = "".join((c.get("delta") or {}).get("content") or "" for c in choices)
                sample.finish_reason = next((c["finish_reason"] for c in choices if c.get("finish_reason")),
                                            sample.finish_reason)
                if content:
                    parts.append(content)
                    chunks += 1
                    if last is None:
                        sample.ttft_s = now - start
                    else:
                        sample.gaps_s.append(now - last)
                    last = now
                usage = chunk.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    sample.output_tokens = int(usage["completion_tokens"])
                    sample.tokens_from = "usage"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        sample.error = f"{type(exc).__name__}: {exc}"[:300]
        return sample
    sample.latency_s = time.perf_counter() - start
    sample.content = "".join(parts)
    if sample.tokens_from != "usage":
        sample.output_tokens = chunks
    return sample


async def request(client: httpx.AsyncClient, body: dict[str, Any], *, stream: bool = False, expect: int = 200,
                  path: str = CHAT) -> Sample:
    """Send one request and read the whole answer (a stream as raw bytes); an unexpected status is an error."""
    start = time.perf_counter()
    try:
        if stream:
            async with client.stream("POST", path, json=body) as response:
                async for _ in response.aiter_raw():
                    pass
                text = ""
        else:
            response = await client.post(path, json=body)
            text = response.text
    except httpx.HTTPError as exc:
        return Sample(error=f"{type(exc).__name__}: {exc}"[:300])
    latency = time.perf_counter() - start
    if response.status_code != expect:
        return Sample(latency_s=latency, error=f"HTTP {response.status_code} (expected {expect}): {text[:300]}")
    return Sample(latency_s=latency)


# ---------------------------------------------------------------------------------------------- the loop


async def closed_loop(job: Callable[[int], Awaitable[Sample]], count: int, concurrency: int,
                      timeout_s: float | None = None, duration_s: float | None = None) -> Run:
    """``concurrency`` workers, each awaiting ``job(i)`` for the next unsent ``i`` until ``count`` are sent.

    After ``timeout_s`` the loop is cut short; requests it did not finish say so in their ``error``.  With
    ``duration_s`` no request starts after that many seconds: the run holds only the requests that started,
    and its wall time ends when the last of them did.
    """
    done: dict[int, Sample] = {}
    order = itertools.count()
    start = time.perf_counter()
    stop = math.inf if duration_s is None else start + duration_s

    async def worker() -> None:
        while time.perf_counter() < stop and (i := next(order)) < count:
            done[i] = await job(i)

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), timeout_s)
    wall = time.perf_counter() - start
    sent = count if duration_s is None else min(next(order), count)
    return Run([done.get(i) or Sample(error=NOT_RUN) for i in range(sent)], wall)


def poisson_arrivals(count: int, rate_per_s: float, seed: int = 0) -> list[float]:
    """Start times (seconds from 0) of ``count`` arrivals of a Poisson process: exponential gaps, seeded."""
    rng = random.Random(seed)
    times, t = [], 0.0
    for _ in range(count):
        times.append(t)
        t += rng.expovariate(rate_per_s)
    return times


async def open_loop(job: Callable[[int], Awaitable[T]], arrivals: Sequence[float],
                    timeout_s: float | None = None) -> tuple[list[T | None], float]:
    """Job ``i`` starts at ``arrivals[i]`` seconds whether or not earlier jobs ended (open loop, as real users).

    Returns each job's result (None when the run was cut short after ``timeout_s``) and the wall time from the
    first arrival to the last job's end.
    """
    results: list[T | None] = [None] * len(arrivals)
    start = time.perf_counter()

    async def arrive(i: int) -> None:
        await asyncio.sleep(max(0.0, start + arrivals[i] - time.perf_counter()))
        results[i] = await job(i)

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(arrive(i) for i in range(len(arrivals)))), timeout_s)
    return results, time.perf_counter() - start


def http_client(base_url: str, concurrency: int, headers: dict[str, str] | None = None,
                timeout_s: float = 300.0) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    return httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits,
                             timeout=httpx.Timeout(timeout_s, connect=30.0))


Send = Callable[[httpx.AsyncClient, dict[str, Any]], Awaitable[Sample]]


async def run(base_url: str, bodies: list[dict[str, Any]], concurrency: int, *, send: Send = chat_stream,
              headers: dict[str, str] | None = None, timeout_s: float | None = None) -> Run:
    """One closed loop over ``bodies`` with httpx; ``send`` is ``chat_stream`` or a ``request`` variant."""
    async with http_client(base_url, concurrency, headers, timeout_s or 300.0) as client:
        return await closed_loop(lambda i: send(client, bodies[i]), len(bodies), concurrency, timeout_s)


async def run_aiohttp(url: str, body: dict[str, Any], count: int, concurrency: int,
                      headers: dict[str, str] | None = None) -> Run:
    """One closed loop of the same pre-encoded POST with aiohttp: latency only, the cheapest client here."""
    data = json.dumps(body).encode()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector,
                                     headers={**(headers or {}), "Content-Type": "application/json"}) as session:
        async def post(_i: int) -> Sample:
            started = time.perf_counter()
            async with session.post(url + CHAT, data=data) as r:
                text = await r.read()
            latency = time.perf_counter() - started
            error = None if r.status == 200 else f"HTTP {r.status}: {text[:300].decode(errors='replace')}"
            return Sample(latency_s=latency, error=error)

        return await closed_loop(post, count, concurrency)


async def run_posts(url: str, bodies: Sequence[bytes], concurrency: int, *, count: int,
                    duration_s: float | None = None, timeout_s: float | None = None,
                    headers: dict[str, str] | None = None, check: Callable[[bytes], str | None] | None = None) -> Run:
    """A closed loop of JSON POSTs to ``url`` with aiohttp, request ``i`` sending ``bodies[i % len(bodies)]``.

    Latency only, the whole answer read; up to ``count`` requests, or as many as start within ``duration_s``.
    ``check(answer)`` returns what is wrong with a 200 answer (None: nothing), so a server that answers fast
    and wrong fails instead of winning.
    """
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_s or 300.0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     headers={**(headers or {}), "Content-Type": "application/json"}) as session:
        async def post(i: int) -> Sample:
            started = time.perf_counter()
            try:
                async with session.post(url, data=bodies[i % len(bodies)]) as r:
                    answer = await r.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                return Sample(error=f"{type(exc).__name__}: {exc}"[:300])
            latency = time.perf_counter() - started
            if r.status != 200:
                return Sample(latency_s=latency, error=f"HTTP {r.status}: {answer[:300].decode(errors='replace')}")
            return Sample(latency_s=latency, error=check(answer) if check is not None else None)

        return await closed_loop(post, count, concurrency, timeout_s, duration_s)


# ---------------------------------------------------------------------------------------------- summary


@dataclass
class Level:
    """A streaming level's numbers (the JSON of ``bench/engine.py``'s levels)."""

    concurrency: int
    requests: int
    wall_s: float
    output_tokens: int
    tok_s: float
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    itl_p50_s: float | None
    tokens_per_request: float
    tokens_from: str
    errors: list[str] = field(default_factory=list)
    # CPU cores kept busy by processes outside this run during the level; high means skewed numbers
    others_cores: float | None = None
    attempts: int = 1
    itl_p99_s: float | None = None


def summarize(concurrency: int, result: Run) -> Level:
    """Output tok/s over the level's wall time, TTFT p50/p99 and ITL p50/p99 pooled over its successful requests."""
    ok = [s for s in result.samples if s.error is None]
    tokens = sum(s.output_tokens for s in ok)
    ttfts = [s.ttft_s for s in ok if s.ttft_s is not None]
    return Level(
        concurrency=concurrency,
        requests=len(result.samples),
        wall_s=result.wall_s,
        output_tokens=tokens,
        tok_s=tokens / result.wall_s if result.wall_s > 0 else 0.0,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p99_s=percentile(ttfts, 99),
        itl_p50_s=percentile([g for s in ok for g in s.gaps_s], 50),
        itl_p99_s=percentile([g for s in ok for g in s.gaps_s], 99),
        tokens_per_request=tokens / len(ok) if ok else 0.0,
        tokens_from="+".join(sorted({s.tokens_from for s in ok}) or ["-"]),
        errors=result.errors,
    )
