"""``POST /v1/completions``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from inhouse.engine.base import Delta, Usage
from inhouse.protocol.common import usage
from inhouse.protocol.completions import CompletionRequest, completion, completion_chunk, completion_logprobs
from inhouse.server.body import read_model
from inhouse.server.context import context_of
from inhouse.server.convert import check_choices, completion_requests
from inhouse.server.generation import collect, route, total_usage
from inhouse.server.render import json_response
from inhouse.server.sse import sse_response
from inhouse.server.streaming import stream_events

__all__ = ["completions"]


class _CompletionChunks:
    def __init__(self, request_id: str, created: int, model: str, include_usage: bool, echoes: list[str]) -> None:
        self.request_id, self.created, self.model, self.include_usage = request_id, created, model, include_usage
        self.echoes = echoes
        self.offsets = [len(e) for e in echoes]

    def opening(self, index: int) -> dict[str, Any] | None:
        if not self.echoes[index]:
            return None
        return {"index": index, "text": self.echoes[index], "logprobs": None, "finish_reason": None}

    def choice(self, index: int, delta: Delta) -> dict[str, Any]:
        logprobs = completion_logprobs(delta.logprobs, self.offsets[index])
        self.offsets[index] += len(delta.text)
        return {"index": index, "text": delta.text, "logprobs": logprobs, "finish_reason": delta.finish_reason}

    def chunk(self, choices: list[dict[str, Any]], totals: dict[str, Any] | None) -> dict[str, Any]:
        return completion_chunk(self.request_id, self.created, self.model, choices, totals, self.include_usage)


async def completions(request: Request) -> Response:
    ctx = context_of(request)
    body = await read_model(request, CompletionRequest, ctx.settings.max_body_bytes)
    prompts = body.prompts()
    check_choices(body.n, len(prompts), ctx.settings.max_choices)
    request_id = ctx.new_id("cmpl")
    routed, call = await route(request, body.model, body.stream, request_id,
                               completion_requests(body, request_id))
    generations, model = routed.result, routed.model
    created = int(time.time())
    headers = {"x-request-id": request_id, "x-inhouse-deployment": routed.deployment.label}

    def prompts_of(usages: Sequence[Usage]) -> Sequence[Usage]:  # each prompt's n choices share it
        return [usages[p * body.n] for p in range(len(prompts))]

    if call is not None:
        call.prompt("\n".join(p for p in prompts if isinstance(p, str)) if call.keep_text else None,
                    sum(generations[p * body.n].prompt_tokens for p in range(len(prompts))))
    echoes = [(prompts[i // body.n] if body.echo and isinstance(prompts[i // body.n], str) else "")
              for i in range(len(generations))]
    if body.stream:
        render = _CompletionChunks(request_id, created, model, body.include_usage, echoes)  # type: ignore[arg-type]
        events = stream_events(generations, prompts_of, body.include_usage, render, call)
        return sse_response(events, ctx.settings.keepalive_seconds, headers)
    results = await collect(generations, request)
    totals = total_usage([r.usage for r in results if r.usage is not None], prompts_of)
    if call is not None:
        call.output("".join(r.text for r in results), totals.completion_tokens)
        call.used(totals, results[0].finish_reason)
    choices = [
        {
            "index": i,
            "text": str(echoes[i]) + r.text,
            "logprobs": completion_logprobs(r.logprobs, len(echoes[i])),
            "finish_reason": r.finish_reason,
        }
        for i, r in enumerate(results)
    ]
    return json_response(completion(request_id, created, model, choices,
                                    usage(totals.prompt_tokens, totals.completion_tokens, totals.cached_tokens)),
                         headers=headers)
