"""``inhouse bench``'s load: closed-loop streaming chat requests at a concurrency, and what they measured.

Owns one request's sample (time to first token, gaps between tokens, output tokens) for two targets — a
running server over HTTP (any OpenAI-compatible one) and an engine in this process — the closed loop that
keeps ``concurrency`` requests in flight, and a level's summary (tokens/s over wall time, TTFT and
inter-token p50/p99).  The same measurements as the repository's ``bench/engine.py``, which it does not
import: the installed package has no ``bench/``.  Holds no state beyond one run.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from inhouse.engine.base import Capability, GenerateRequest, Generator, SamplingParams
from inhouse.errors import InhouseError

__all__ = ["PROMPTS", "Level", "Sample", "closed_loop", "engine_sender", "http_sender", "percentile", "summarize"]

PROMPTS = (
    "Explain the difference between a process and a thread, with one example of when to choose each.",
    "Write a short, friendly email telling my team the office is closed next Friday for maintenance.",
    "What are the pros and cons of renting versus buying a home for someone who may move soon?",
    "How does compound interest work? Walk me through 1,000 dollars at 5 percent over ten years.",
    "Give me five ideas for a birthday party for a seven-year-old who loves dinosaurs.",
    "Why is the sky blue during the day but red at sunset? Keep the physics simple but correct.",
    "My Python script runs out of memory reading a large CSV file. What can I do?",
    "Describe what a product manager does day to day at a software company.",
)


@dataclass
class Sample:
    """One request: when its first token came, the gaps between later ones, how many, and how it ended."""

    ttft_s: float | None = None
    latency_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None


Send = Callable[[int], Awaitable[Sample]]


@dataclass(frozen=True)
class Level:
    """One concurrency level's numbers (the JSON ``inhouse bench --json`` prints, per level)."""

    concurrency: int
    requests: int
    errors: int
    wall_s: float
    output_tokens: int
    tokens_per_s: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    latency_p50_s: float | None
    first_error: str | None = None


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100), interpolated between closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


async def closed_loop(send: Send, count: int, concurrency: int) -> tuple[list[Sample], float]:
    """``concurrency`` workers send requests ``0..count-1``, each the next as soon as its last one ended."""
    done: dict[int, Sample] = {}
    order = itertools.count()

    async def worker() -> None:
        while (i := next(order)) < count:
            done[i] = await send(i)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [done[i] for i in range(count)], time.perf_counter() - start


def summarize(concurrency: int, samples: list[Sample], wall_s: float) -> Level:
    ok = [s for s in samples if s.error is None]
    tokens = sum(s.output_tokens for s in ok)
    ttfts = [s.ttft_s * 1000 for s in ok if s.ttft_s is not None]
    gaps = [g * 1000 for s in ok for g in s.gaps_s]
    errors = [s.error for s in samples if s.error is not None]
    return Level(
        concurrency=concurrency, requests=len(samples), errors=len(errors), wall_s=round(wall_s, 3),
        output_tokens=tokens, tokens_per_s=round(tokens / wall_s, 2) if wall_s > 0 else 0.0,
        ttft_p50_ms=_round(percentile(ttfts, 50)), ttft_p99_ms=_round(percentile(ttfts, 99)),
        itl_p50_ms=_round(percentile(gaps, 50)), itl_p99_ms=_round(percentile(gaps, 99)),
        latency_p50_s=_round(percentile([s.latency_s for s in ok if s.latency_s is not None], 50)),
        first_error=errors[0] if errors else None,
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class _Clock:
    """The times of one request's tokens, as they arrive."""

    def __init__(self) -> None:
        self.sample = Sample()
        self.start = time.perf_counter()
        self.last: float | None = None

    def tokens(self, count: int) -> None:
        now = time.perf_counter()
        if self.last is None:
            self.sample.ttft_s = now - self.start
        else:
            self.sample.gaps_s.append(now - self.last)
        self.last = now
        self.sample.output_tokens += count

    def end(self) -> Sample:
        self.sample.latency_s = time.perf_counter() - self.start
        return self.sample


def http_sender(client: httpx.AsyncClient, model: str, max_tokens: int, ignore_eos: bool) -> Send:
    """Requests to ``client``'s server: streaming chat completions, usage at the end."""

    async def send(i: int) -> Sample:
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                "max_tokens": max_tokens, "temperature": 0, "stream": True,
                                "stream_options": {"include_usage": True}}
        if ignore_eos:
            body["ignore_eos"] = True
        clock = _Clock()
        usage: int | None = None
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    return Sample(error=f"HTTP {response.status_code}: {text[:300]}")
                async for line in response.aiter_lines():
                    data = line[5:].strip() if line.startswith("data:") else ""
                    if not data or data == "[DONE]":
                        continue
                    chunk = json.loads(data)
                    if "error" in chunk:
                        return Sample(error=f"stream error: {json.dumps(chunk['error'])[:300]}")
                    if any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                        clock.tokens(1)  # a content chunk; the usage at the end gives the true token count
                    if (chunk.get("usage") or {}).get("completion_tokens") is not None:
                        usage = int(chunk["usage"]["completion_tokens"])
        except (httpx.HTTPError, ValueError) as exc:
            return Sample(error=f"{type(exc).__name__}: {exc}"[:300])
        sample = clock.end()
        if usage is not None:
            sample.output_tokens = usage
        return sample

    return send


def engine_sender(engine: Generator, max_tokens: int, ignore_eos: bool) -> Send:
    """Requests straight to an engine in this process: no HTTP, no server."""
    chat = Capability.CHAT in engine.info.capabilities

    async def send(i: int) -> Sample:
        text = PROMPTS[i % len(PROMPTS)]
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)
        request = GenerateRequest(f"bench-{i}", sampling, messages=({"role": "user", "content": text},)) if chat \
            else GenerateRequest(f"bench-{i}", sampling, prompt=text)
        clock = _Clock()
        usage: int | None = None
        try:
            (generation,) = await engine.submit([request])
            async for delta in generation:
                if delta.token_count or delta.text:
                    clock.tokens(delta.token_count or 1)
                if delta.usage is not None:
                    usage = delta.usage.completion_tokens
        except InhouseError as exc:
            return Sample(error=f"{exc.code.value}: {exc}"[:300])
        sample = clock.end()
        if usage is not None:
            sample.output_tokens = usage
        return sample

    return send
