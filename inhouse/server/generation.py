"""Runs the Generations behind one HTTP request: routes and admits them (noting the key's call), then merges
or collects their output.

Shared by the chat and completion routes, which differ only in how they render.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field

from starlette.requests import Request

from inhouse.engine.base import Delta, GenerateRequest, Generation, TokenLogprob, Usage
from inhouse.gateway.router import Routed
from inhouse.server.call import Call, call_of
from inhouse.server.context import context_of
from inhouse.server.disconnect import or_disconnect
from inhouse.server.operations import GENERATION, generator, require

__all__ = ["ChoiceResult", "collect", "merged", "route", "total_usage"]


@dataclass
class ChoiceResult:
    text: str = ""
    tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    usage: Usage | None = None  # from the finishing Delta
    _parts: list[str] = field(default_factory=list)


def total_usage(usages: Sequence[Usage], prompt_of: Callable[[Sequence[Usage]], int]) -> Usage:
    """The call's usage from its choices': ``prompt_of`` counts the prompt once per prompt (chat choices share
    one; each prompt of a completions call has ``n`` choices)."""
    return Usage(prompt_of(usages), sum(u.completion_tokens for u in usages))


async def route(request: Request, model: str, stream: bool, request_id: str,
                requests: list[GenerateRequest]) -> tuple[Routed[list[Generation]], Call | None]:
    """Find the model (404), check the key may use it (403), admit it where the router says, note who answered,
    and reserve prompt + max_tokens against the key's token budget (429, the admitted work aborted).
    The deployment counts the call in flight until its last generation ends."""
    ctx = context_of(request)
    require(ctx.registry, model, GENERATION)  # an unknown model is 404 (and an embedder 400) before a 403
    call = call_of(request)
    if call is not None:
        call.asked(request_id, model, stream)
    routed = await ctx.router.call(model, lambda d: generator(d.engine, d.name).submit(requests))
    remaining = len(routed.result)

    def one_done() -> None:
        nonlocal remaining
        remaining -= 1
        if remaining == 0:
            routed.release()

    for generation in routed.result:
        generation.add_done_callback(one_done)
    if not routed.result:
        routed.release()
    if call is not None:
        call.served(routed.model, routed.deployment.label)
        try:  # the key's token budget holds what this call may use, before it uses any
            await call.reserve(sum(g.prompt_tokens + g.max_tokens for g in routed.result))
        except BaseException:
            for generation in routed.result:
                generation.abort()
            raise
    return routed, call


async def merged(generations: list[Generation]) -> AsyncGenerator[tuple[int, Delta]]:
    """(choice index, delta) from all generations, as they arrive.  Aborts all when closed early."""
    if len(generations) == 1:
        async with contextlib.aclosing(aiter(generations[0])) as deltas:  # closed early: aborted at once
            async for delta in deltas:
                yield 0, delta
        return
    queue: asyncio.Queue[tuple[int, Delta] | tuple[int, BaseException] | None] = asyncio.Queue()

    async def pump(index: int, generation: Generation) -> None:
        try:
            async for delta in generation:
                await queue.put((index, delta))
        except Exception as exc:
            await queue.put((index, exc))
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
                continue
            index, payload = item
            if isinstance(payload, BaseException):
                raise payload
            yield index, payload
    finally:
        for task in tasks:
            task.cancel()
        for generation in generations:
            generation.abort()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)


async def collect(generations: list[Generation], request: Request) -> list[ChoiceResult]:
    """Wait for complete answers; if the client goes away first, abort the generations."""
    results = [ChoiceResult() for _ in generations]

    async def gather() -> None:
        async for index, delta in merged(generations):
            result = results[index]
            result._parts.append(delta.text)
            result.tokens += delta.token_count
            if delta.logprobs is not None:
                result.logprobs = (result.logprobs or []) + delta.logprobs
            if delta.finish_reason is not None:
                result.finish_reason = delta.finish_reason
                result.usage = delta.usage

    await or_disconnect(request, gather())
    for result, generation in zip(results, generations, strict=True):
        result.text = "".join(result._parts)
        result.usage = result.usage or Usage(generation.prompt_tokens, result.tokens)  # engines send it
    return results
