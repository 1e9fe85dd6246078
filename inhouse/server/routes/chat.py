"""``POST /v1/chat/completions``.

Renders content, thinking (``reasoning_content`` and ``reasoning``, the same text) and tool calls; the serving
deployment's parsers (``inhouse.server.parsers``) split them out of a local model's text.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from inhouse.engine.base import Delta, EngineInfo, GenerateRequest, ToolCallDelta, Usage
from inhouse.protocol.chat import ChatCompletionRequest, chat_chunk, chat_completion, chat_logprobs
from inhouse.protocol.common import usage
from inhouse.server.body import read_model
from inhouse.server.context import context_of
from inhouse.server.convert import chat_requests, check_choices
from inhouse.server.generation import ChoiceResult, collect, route, total_usage
from inhouse.server.images import without_image_data
from inhouse.server.parsers import ChoiceParser, choice_parser
from inhouse.server.render import json_response
from inhouse.server.sse import sse_response
from inhouse.server.streaming import stream_events

__all__ = ["chat_completions"]


class _ChatChunks:
    def __init__(self, request_id: str, created: int, model: str, include_usage: bool, legacy: bool) -> None:
        self.request_id, self.created, self.model, self.include_usage = request_id, created, model, include_usage
        self.legacy = legacy  # the request sent legacy `functions`: calls go out as `function_call`

    def opening(self, index: int) -> dict[str, Any]:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def choice(self, index: int, delta: Delta) -> dict[str, Any]:
        out: dict[str, Any] = _reasoning(delta.reasoning)
        if delta.text:
            out["content"] = delta.text
        finish = delta.finish_reason
        if delta.tool_calls and self.legacy:
            out |= _function_call_piece(delta.tool_calls)
        elif delta.tool_calls:
            out["tool_calls"] = [_tool_call_piece(piece) for piece in delta.tool_calls]
        if self.legacy and finish == "tool_calls":
            finish = "function_call"
        return {"index": index, "delta": out, "logprobs": chat_logprobs(delta.logprobs), "finish_reason": finish}

    def chunk(self, choices: list[dict[str, Any]], totals: dict[str, Any] | None) -> dict[str, Any]:
        return chat_chunk(self.request_id, self.created, self.model, choices, totals, self.include_usage)


def _reasoning(text: str) -> dict[str, Any]:
    """Thinking under both names clients read: ``reasoning_content`` (DeepSeek, Dify) and ``reasoning`` (vLLM)."""
    return {"reasoning_content": text, "reasoning": text} if text else {}


def _tool_call_piece(piece: ToolCallDelta) -> dict[str, Any]:
    """A call's first piece carries its id, type and name; later pieces only the index and argument text."""
    if piece.id is None:
        return {"index": piece.index, "function": {"arguments": piece.arguments}}
    return {"index": piece.index, "id": piece.id, "type": "function",
            "function": {"name": piece.name or "", "arguments": piece.arguments}}


def _function_call_piece(pieces: list[ToolCallDelta]) -> dict[str, Any]:
    """Legacy ``functions`` answers: the first call only, as ``function_call`` (name once, then argument text)."""
    first = [piece for piece in pieces if piece.index == 0]
    if not first:
        return {}
    call: dict[str, Any] = {"arguments": "".join(piece.arguments for piece in first)}
    name = next((piece.name for piece in first if piece.name), None)
    if name is not None:
        call["name"] = name
    return {"function_call": call}


def _message(result: ChoiceResult, legacy: bool) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant",
                               "content": result.text if result.text or not result.tool_calls else None}
    if result.tool_calls and legacy:
        message["function_call"] = result.tool_calls[0]["function"]
    elif result.tool_calls:
        message["tool_calls"] = result.tool_calls
    return message | _reasoning(result.reasoning)


def _messages_text(messages: Any) -> str:
    return orjson.dumps([without_image_data(m.model_dump(exclude_none=True)) for m in messages]).decode()


async def chat_completions(request: Request) -> Response:
    ctx = context_of(request)
    body = await read_model(request, ChatCompletionRequest, ctx.settings.max_body_bytes)
    check_choices(body.n, 1, ctx.settings.max_choices)
    request_id = ctx.new_id("chatcmpl")
    requests = chat_requests(body, request_id)
    routed, call = await route(request, body.model, body.stream, request_id, requests)
    generations, model = routed.result, routed.model
    parsers = _parsers(routed.deployment.engine.info, requests)
    legacy = bool(body.functions) and not body.tools  # OpenAI's legacy functions get function_call answers
    created = int(time.time())
    headers = {"x-request-id": request_id, "x-inhouse-deployment": routed.deployment.label}
    if call is not None:
        call.prompt(_messages_text(body.messages) if call.keep_text else None, generations[0].prompt_tokens)
    if body.stream:
        render = _ChatChunks(request_id, created, model, body.include_usage, legacy)
        events = stream_events(generations, _one_prompt, body.include_usage, render, call, parsers)
        return sse_response(events, ctx.settings.keepalive_seconds, headers)
    results = await collect(generations, request, parsers)
    totals = total_usage([r.usage for r in results if r.usage is not None], _one_prompt)
    if call is not None:
        call.output("".join(r.audit_text() for r in results), totals.completion_tokens)
        call.used(totals, results[0].finish_reason)
    choices = [
        {"index": i, "message": _message(r, legacy), "logprobs": chat_logprobs(r.logprobs),
         "finish_reason": "function_call" if legacy and r.finish_reason == "tool_calls" else r.finish_reason}
        for i, r in enumerate(results)
    ]
    return json_response(chat_completion(request_id, created, model, choices,
                                         usage(totals.prompt_tokens, totals.completion_tokens, totals.cached_tokens)),
                         headers=headers)


def _parsers(info: EngineInfo, requests: list[GenerateRequest]) -> list[ChoiceParser | None]:
    return [choice_parser(info, r) for r in requests]


def _one_prompt(usages: Sequence[Usage]) -> Sequence[Usage]:
    """Every choice of a chat call answers the same prompt."""
    return usages[:1]
