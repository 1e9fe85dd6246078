"""The workloads of ``bench/workload.py``: how each one drives a server under test and what it records.

Owns ``Target`` (a started server and the fields its requests carry), ``Phase`` (one workload variant's numbers:
the ``load.Level`` of its main group, peak RSS, prefix-cache hit rate, jobs/s and extra TTFTs of its other
groups), driving jobs closed-loop or open-loop (``drive``), measuring a run (``measured``), and the five
workloads: ``rag``, ``multiturn``, ``mixed``, ``knowledge`` and ``cold`` (``RUNS``; each takes the attempt, so a
re-measured one sends prompts of its own), with ``capacity``, the closed loop's rate that calibrates the open
loop.  It must not start servers, print or know a contender.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench import engine
from bench.common import load, machine, scrape
from bench.workload_texts import (
    SEED,
    Texts,
    cold_prompts,
    conversation_turns,
    knowledge_prompt,
    long_prompts,
    rag_requests,
)

__all__ = ["OPEN_LOOP", "RUNS", "Phase", "Target", "capacity", "conversation", "drive"]


@dataclass
class Phase:
    """One workload variant on one contender: its numbers, peak RSS, prefix-cache hit rate and jobs/s."""

    variant: str
    level: load.Level
    jobs: int
    jobs_per_s: float
    peak_rss: int | None = None
    prefix_hit: float | None = None
    extra: dict[str, float | None] = field(default_factory=dict)

    @property
    def others_cores(self) -> float | None:
        """Cores other processes used while it ran (``machine.least_disturbed`` keeps the least disturbed)."""
        return self.level.others_cores

    @property
    def attempts(self) -> int:
        return self.level.attempts

    @attempts.setter
    def attempts(self, n: int) -> None:
        self.level.attempts = n


@dataclass(frozen=True)
class Target:
    """A server under test and how to ask it."""

    url: str
    pid: int
    body: dict[str, Any]  # the contender's extra fields (model, ignore_eos or its equivalent)
    timeout_s: float


Job = Callable[[httpx.AsyncClient, int], Awaitable[list[load.Sample]]]
Groups = tuple[dict[str, list[load.Sample]], float]  # samples by group ("main" is what the table shows), wall time


def ask(target: Target, messages: list[dict[str, str]], max_tokens: int) -> Callable[[httpx.AsyncClient],
                                                                                    Awaitable[load.Sample]]:
    body = {"messages": messages, "max_tokens": max_tokens, "stream": True, "temperature": 0.0, **target.body}
    return lambda client: load.chat_stream(client, body)


async def conversation(target: Target, client: httpx.AsyncClient, system: str, turns: list[str],
                       max_tokens: int) -> list[load.Sample]:
    """One user's turns, each resending the whole history with the answers the server gave."""
    history = [{"role": "system", "content": system}]
    samples = []
    for turn in turns:
        history.append({"role": "user", "content": turn})
        sample = await ask(target, list(history), max_tokens)(client)
        samples.append(sample)
        if sample.error is not None:
            break
        history.append({"role": "assistant", "content": sample.content})
    return samples


async def drive(target: Target, job: Job, count: int, *, concurrency: int | None = None,
                arrivals: list[float] | None = None) -> tuple[list[load.Sample], float]:
    """``count`` jobs closed-loop (``concurrency`` clients) or open-loop (at ``arrivals``); samples and wall."""
    async with load.http_client(target.url, max(concurrency or 0, count), timeout_s=target.timeout_s) as client:
        if arrivals is not None:
            results, wall = await load.open_loop(lambda i: job(client, i), arrivals, target.timeout_s)
            return [s for r in results for s in (r or [load.Sample(error=load.NOT_RUN)])], wall
        lists: dict[int, list[load.Sample]] = {}

        async def one(i: int) -> load.Sample:
            lists[i] = await job(client, i)
            return lists[i][-1]

        run = await load.closed_loop(one, count, concurrency or 1, target.timeout_s)
        return [s for i in range(len(run.samples)) for s in lists.get(i, [run.samples[i]])], run.wall_s


def measured(target: Target, variant: str, jobs: int, concurrency: int,
             run: Callable[[], Coroutine[Any, Any, Groups]]) -> Phase:
    """Run ``run`` while sampling the server's RSS and CPU; the phase's numbers from the ``main`` group."""
    before, cpu = scrape.read(target.url), machine.cpu_snapshot(target.pid)
    with machine.PeakRss(target.pid) as rss:
        groups, wall = asyncio.run(run())
    level = load.summarize(concurrency, load.Run(groups["main"], wall))
    level.others_cores = machine.others_cores(cpu, machine.cpu_snapshot(target.pid))
    extra: dict[str, float | None] = {}
    main = {id(s) for s in groups["main"]}
    for name, samples in groups.items():
        if name != "main":
            extra[f"{name}_ttft_p50_s"] = load.percentile([s.ttft_s for s in samples if s.ttft_s is not None], 50)
            latencies = [s.latency_s for s in samples if s.latency_s is not None]
            extra[f"{name}_latency_mean_s"] = sum(latencies) / len(latencies) if latencies else None
            level.errors += [s.error for s in samples if s.error is not None and id(s) not in main]
    return Phase(variant, level, jobs, jobs / wall if wall > 0 else 0.0, rss.peak,
                 scrape.hit_rate(before, scrape.read(target.url)), extra)


async def _one(sample: Awaitable[load.Sample]) -> list[load.Sample]:
    return [await sample]


async def _main(driven: Awaitable[tuple[list[load.Sample], float]]) -> Groups:
    samples, wall = await driven
    return {"main": samples}, wall


def _loop(rate: float | None, count: int, concurrency: int) -> dict[str, Any]:
    """``drive``'s arguments: closed with ``concurrency`` clients, or open at ``rate`` jobs/s."""
    if rate is None:
        return {"concurrency": concurrency}
    return {"arrivals": load.poisson_arrivals(count, rate, SEED)}


def rag(target: Target, texts: Texts, rate: float | None, attempt: int) -> Phase:
    """RAG questions: shared system prompt + a topic's retrieved context + a question; ``rag_requests`` of them."""
    sizes, variant = texts.sizes, "closed" if rate is None else "open"
    requests = rag_requests(texts, variant, attempt)

    def job(client: httpx.AsyncClient, i: int) -> Awaitable[list[load.Sample]]:
        return _one(ask(target, requests[i], sizes.max_tokens)(client))

    label = f"closed c={sizes.rag_concurrency}" if rate is None else f"open {rate:.3g} req/s"
    return measured(target, label, len(requests), sizes.rag_concurrency,
                    lambda: _main(drive(target, job, len(requests), **_loop(rate, len(requests),
                                                                             sizes.rag_concurrency))))


def multiturn(target: Target, texts: Texts, rate: float | None, attempt: int) -> Phase:
    """``conversations`` users of ``turns`` turns each, every turn resending the history; closed: all at once."""
    sizes, variant, n = texts.sizes, "closed" if rate is None else "open", texts.sizes.conversations

    def job(client: httpx.AsyncClient, c: int) -> Awaitable[list[load.Sample]]:
        return conversation(target, client, texts.system, conversation_turns(texts, variant, c, attempt),
                            sizes.max_tokens)

    label = f"closed {n} users" if rate is None else f"open {rate:.3g} conv/s"
    return measured(target, label, n, n, lambda: _main(drive(target, job, n, **_loop(rate, n, n))))


def mixed(target: Target, texts: Texts, rate: float | None, attempt: int) -> Phase:
    """``mixed_streams`` short chats stream (closed loop) until every long prompt was answered; the long prompts
    come one after another (closed) or at Poisson arrivals (open), starting a second in.  Main group: the
    streams; ``long``: the long prompts (1 new token each)."""
    sizes, variant = texts.sizes, "closed" if rate is None else "open"
    longs = long_prompts(texts, variant, attempt)

    async def go() -> Groups:
        done = asyncio.Event()
        started = time.perf_counter()
        async with load.http_client(target.url, sizes.mixed_streams + sizes.mixed_long,
                                    timeout_s=target.timeout_s) as client:
            async def stream(s: int) -> list[load.Sample]:
                out: list[load.Sample] = []
                while len(out) < sizes.mixed_min_requests or not done.is_set():
                    prompt = engine.PROMPTS[(s + len(out) * sizes.mixed_streams) % len(engine.PROMPTS)]
                    out.append(await ask(target, prompt, sizes.stream_tokens)(client))
                    if out[-1].error is not None:
                        break
                return out

            async def long_ones() -> list[load.Sample]:
                await asyncio.sleep(1.0)
                try:
                    if rate is None:
                        return [await ask(target, m, 1)(client) for m in longs]
                    results, _ = await load.open_loop(lambda i: ask(target, longs[i], 1)(client),
                                                      load.poisson_arrivals(len(longs), rate, SEED))
                    return [r or load.Sample(error=load.NOT_RUN) for r in results]
                finally:
                    done.set()

            shorts, long_samples = await asyncio.wait_for(
                asyncio.gather(asyncio.gather(*(stream(s) for s in range(sizes.mixed_streams))), long_ones()),
                target.timeout_s)
        return {"main": [s for out in shorts for s in out], "long": long_samples}, time.perf_counter() - started

    label = "long one by one" if rate is None else f"long {rate:.3g}/s"
    return measured(target, f"{sizes.mixed_streams} streams, {label}", sizes.mixed_long, sizes.mixed_streams, go)


def knowledge(target: Target, texts: Texts, _rate: float | None, attempt: int) -> Phase:
    """One long system+context prompt never seen before, then different questions over it, one at a time."""
    sizes = texts.sizes
    system, questions = knowledge_prompt(texts, attempt)

    async def go() -> Groups:
        started = time.perf_counter()
        async with load.http_client(target.url, 1, timeout_s=target.timeout_s) as client:
            samples = [await ask(target, [{"role": "system", "content": system}, {"role": "user", "content": q}],
                                 sizes.knowledge_max_tokens)(client) for q in questions]
        return {"main": samples, "first": samples[:1], "later": samples[1:]}, time.perf_counter() - started

    phase = measured(target, f"{texts.count(system)} tokens, {len(questions)} questions", len(questions), 1, go)
    first, later = phase.extra["first_ttft_p50_s"], phase.extra["later_ttft_p50_s"]
    phase.extra["later_over_first"] = later / first if first and later is not None else None
    return phase


def cold(target: Target, texts: Texts, _rate: float | None, attempt: int) -> Phase:
    """A prompt of ``cold_tokens`` the server has never seen (a fresh first line), ``cold_repeats`` times."""
    prompts = cold_prompts(texts, attempt)

    async def go() -> Groups:
        started = time.perf_counter()
        async with load.http_client(target.url, 1, timeout_s=target.timeout_s) as client:
            samples = [await ask(target, p, 2)(client) for p in prompts]
        return {"main": samples}, time.perf_counter() - started

    return measured(target, f"{texts.count(prompts[0][0]['content'])} tokens x {len(prompts)}", len(prompts), 1, go)


RUNS: dict[str, Callable[[Target, Texts, float | None, int], Phase]] = {
    "cold": cold, "knowledge": knowledge, "rag": rag, "multiturn": multiturn, "mixed": mixed}
OPEN_LOOP = ("rag", "multiturn", "mixed")


def capacity(workload: str, closed: Phase) -> float | None:
    """What the closed loop managed, in the unit its open loop arrives in: requests, conversations or long
    prompts per second."""
    if workload == "mixed":
        mean = closed.extra.get("long_latency_mean_s")
        return 1.0 / mean if mean else None
    return closed.jobs_per_s or None

