"""Runs the Generations behind one HTTP request: routes and admits them (noting the key's call), then merges
or collects their output.

Shared by the chat and completion routes, which differ only in how they render.  A chat choice's deltas may pass
through a parser (``inhouse.server.parsers``) on their way out of ``merged``, which splits thinking and tool calls
out of their text.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from inhouse.engine.base import Capability, Delta, GenerateRequest, Generation, TokenLogprob, ToolCallDelta, Usage
from inhouse.errors import ErrorCode, InhouseError
from inhouse.gateway.router import Routed
from inhouse.server.call import Call, call_of
from inhouse.server.context import context_of
from inhouse.server.convert import images_in
from inhouse.server.disconnect import or_disconnect
from inhouse.server.images import with_images
from inhouse.server.operations import GENERATION, generator, require

__all__ = ["ChoiceResult", "Parsers", "audit_text", "collect", "merged", "route", "total_usage"]

# per choice: a function a choice's deltas pass through (a parser), or None
Parsers = Sequence[Callable[[Delta], Delta] | None]


@dataclass
class ChoiceResult:
    text: str = ""
    tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    usage: Usage | None = None  # from the finishing Delta
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI's {id, type, function: {name, arguments}}
    _parts: list[str] = field(default_factory=list)
    _reasoning: list[str] = field(default_factory=list)

    def add(self, delta: Delta) -> None:
        self._parts.append(delta.text)
        self._reasoning.append(delta.reasoning)
        self.tokens += delta.token_count
        for piece in delta.tool_calls or ():
            self._add_call(piece)
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.usage = delta.usage

    def audit_text(self) -> str:
        calls = [ToolCallDelta(i, name=c["function"]["name"] or "?", arguments=c["function"]["arguments"])
                 for i, c in enumerate(self.tool_calls)]
        return audit_text(self.text, calls)

    def _add_call(self, piece: ToolCallDelta) -> None:
        if piece.index >= len(self.tool_calls):
            self.tool_calls.append({"id": piece.id or "", "type": "function",
                                    "function": {"name": piece.name or "", "arguments": ""}})
        call = self.tool_calls[min(piece.index, len(self.tool_calls) - 1)]
        if piece.id:
            call["id"] = piece.id
        if piece.name:
            call["function"]["name"] = piece.name
        call["function"]["arguments"] += piece.arguments


def audit_text(text: str, calls: Sequence[ToolCallDelta] | None) -> str:
    """An answer's text as the audit log keeps it: the content, then each tool call on its own line as
    ``[call <name>] <arguments>``.  Pieces of a streamed call add up to the line of the whole call."""
    return text + "".join((f"\n[call {c.name}] " if c.name else "") + c.arguments for c in calls or ())


def total_usage(usages: Sequence[Usage], prompts_of: Callable[[Sequence[Usage]], Sequence[Usage]]) -> Usage:
    """The call's usage from its choices': ``prompts_of`` picks one choice's usage per prompt (chat choices share
    one; each prompt of a completions call has ``n`` choices), whose prompt and cached tokens count once.  The
    cached tokens are left unknown (None) when an engine did not count them for one of those prompts."""
    prompts = prompts_of(usages)
    cached = [u.cached_tokens for u in prompts if u.cached_tokens is not None]
    return Usage(sum(u.prompt_tokens for u in prompts), sum(u.completion_tokens for u in usages),
                 sum(cached) if len(cached) == len(prompts) else None)


async def route(request: Request, model: str, stream: bool, request_id: str,
                requests: list[GenerateRequest]) -> tuple[Routed[list[Generation]], Call | None]:
    """Find the model (404), check the key may use it (403), admit it where the router says, note who answered,
    and reserve prompt + max_tokens against the key's token budget (429, the admitted work aborted).
    The deployment counts the call in flight until its last generation ends."""
    ctx = context_of(request)
    require(ctx.registry, model, GENERATION)  # an unknown model is 404 (and an embedder 400) before a 403
    image = images_in(requests[0].messages or ()) if requests else None
    if image is not None and Capability.VISION not in ctx.registry.get(model).engine.info.capabilities:
        raise InhouseError(ErrorCode.UNSUPPORTED, f"the model '{model}' does not take images; send text only",
                           param=f"messages.{image}.content")
    if image is not None:  # decoded and checked against images.* here, whichever engine serves
        requests = await with_images(requests, ctx.settings.images)
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
        call.served(routed.model, routed.deployment.label, routed.deployment.version)
        try:  # the key's token budget holds what this call may use, before it uses any
            await call.reserve(sum(g.prompt_tokens + g.max_tokens for g in routed.result))
        except BaseException:
            for generation in routed.result:
                generation.abort()
            raise
    return routed, call


async def merged(generations: list[Generation], parsers: Parsers = ()) -> AsyncGenerator[tuple[int, Delta]]:
    """(choice index, delta) from all generations, as they arrive, each through its choice's parser (if any).
    Aborts all when closed early."""
    def parsed(index: int, delta: Delta) -> Delta:
        parser = parsers[index] if index < len(parsers) else None
        return delta if parser is None else parser(delta)

    if len(generations) == 1:
        async with contextlib.aclosing(aiter(generations[0])) as deltas:  # closed early: aborted at once
            async for delta in deltas:
                yield 0, parsed(0, delta)
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
            yield index, parsed(index, payload)
    finally:
        for task in tasks:
            task.cancel()
        for generation in generations:
            generation.abort()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)


async def collect(generations: list[Generation], request: Request, parsers: Parsers = ()) -> list[ChoiceResult]:
    """Wait for complete answers; if the client goes away first, abort the generations."""
    results = [ChoiceResult() for _ in generations]

    async def gather() -> None:
        async for index, delta in merged(generations, parsers):
            results[index].add(delta)

    await or_disconnect(request, gather())
    for result, generation in zip(results, generations, strict=True):
        result.text = "".join(result._parts)
        result.reasoning = "".join(result._reasoning)
        result.usage = result.usage or Usage(generation.prompt_tokens, result.tokens)  # engines send it
    return results
