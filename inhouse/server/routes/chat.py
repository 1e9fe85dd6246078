"""``POST /v1/chat/completions``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from inhouse.engine.base import Delta, Usage
from inhouse.protocol.chat import ChatCompletionRequest, chat_chunk, chat_completion, chat_logprobs
from inhouse.protocol.common import usage
from inhouse.server.body import read_model
from inhouse.server.context import context_of
from inhouse.server.convert import chat_requests, check_choices
from inhouse.server.generation import collect, route, total_usage
from inhouse.server.render import json_response
from inhouse.server.sse import sse_response
from inhouse.server.streaming import stream_events

__all__ = ["chat_completions"]


class _ChatChunks:
    def __init__(self, request_id: str, created: int, model: str, include_usage: bool) -> None:
        self.request_id, self.created, self.model, self.include_usage = request_id, created, model, include_usage

    def opening(self, index: int) -> dict[str, Any]:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def choice(self, index: int, delta: Delta) -> dict[str, Any]:
        return {
            "index": index,
            "delta": {"content": delta.text} if delta.text else {},
            "logprobs": chat_logprobs(delta.logprobs),
            "finish_reason": delta.finish_reason,
        }

    def chunk(self, choices: list[dict[str, Any]], totals: dict[str, Any] | None) -> dict[str, Any]:
        return chat_chunk(self.request_id, self.created, self.model, choices, totals, self.include_usage)


def _messages_text(messages: Any) -> str:
    return orjson.dumps([m.model_dump(exclude_none=True) for m in messages]).decode()


async def chat_completions(request: Request) -> Response:
    ctx = context_of(request)
    body = await read_model(request, ChatCompletionRequest, ctx.settings.max_body_bytes)
    check_choices(body.n, 1, ctx.settings.max_choices)
    request_id = ctx.new_id("chatcmpl")
    routed, call = await route(request, body.model, body.stream, request_id,
                               chat_requests(body, request_id))
    generations, model = routed.result, routed.model
    created = int(time.time())
    headers = {"x-request-id": request_id, "x-inhouse-deployment": routed.deployment.label}
    if call is not None:
        call.prompt(_messages_text(body.messages) if call.keep_text else None, generations[0].prompt_tokens)
    if body.stream:
        render = _ChatChunks(request_id, created, model, body.include_usage)
        events = stream_events(generations, _one_prompt, body.include_usage, render, call)
        return sse_response(events, ctx.settings.keepalive_seconds, headers)
    results = await collect(generations, request)
    totals = total_usage([r.usage for r in results if r.usage is not None], _one_prompt)
    if call is not None:
        call.output("".join(r.text for r in results), totals.completion_tokens)
        call.used(totals, results[0].finish_reason)
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": r.text},
            "logprobs": chat_logprobs(r.logprobs),
            "finish_reason": r.finish_reason,
        }
        for i, r in enumerate(results)
    ]
    return json_response(chat_completion(request_id, created, model, choices,
                                         usage(totals.prompt_tokens, totals.completion_tokens)), headers=headers)


def _one_prompt(usages: Sequence[Usage]) -> int:
    """Every choice of a chat call answers the same prompt."""
    return usages[0].prompt_tokens
