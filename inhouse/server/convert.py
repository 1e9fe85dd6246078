"""Wire → engine: turns validated protocol requests into engine GenerateRequests.

Wire types stop here.  Model defaults from the config fill in what the request leaves out.
"""

from __future__ import annotations

from typing import Any

from inhouse.config import SamplingDefaults
from inhouse.engine.base import GenerateRequest, SamplingParams
from inhouse.errors import ErrorCode, InhouseError
from inhouse.protocol.chat import ChatCompletionRequest, ChatMessage
from inhouse.protocol.common import SamplingFields
from inhouse.protocol.completions import CompletionRequest

__all__ = ["chat_requests", "check_choices", "completion_requests"]


def check_choices(n: int, prompts: int, limit: int) -> None:
    """400 when a call asks for more choices (``n`` × prompts) than ``max_choices`` allows."""
    if n * prompts > limit:
        what = f"n={n}" if prompts == 1 else f"{prompts} prompts × n={n}"
        raise InhouseError(ErrorCode.INVALID_REQUEST, f"this request asks for {n * prompts} choices ({what}); "
                           f"this server answers at most {limit} per request (max_choices)",
                           param="n" if prompts == 1 else "prompt")


def _sampling(body: SamplingFields, defaults: SamplingDefaults, logprobs: bool, top_logprobs: int,
              index: int) -> SamplingParams:
    def pick(value: Any, default: Any, fallback: Any) -> Any:
        return value if value is not None else (default if default is not None else fallback)

    top_k = pick(body.top_k, defaults.top_k, 0)
    seed = body.seed + index if body.seed is not None else None
    return SamplingParams(
        max_tokens=body.max_tokens,
        temperature=pick(body.temperature, defaults.temperature, 1.0),
        top_p=pick(body.top_p, defaults.top_p, 1.0),
        top_k=max(top_k, 0),
        seed=seed,
        stop=body.stop_list(),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=pick(body.repetition_penalty, defaults.repetition_penalty, 1.0),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens,
    )


def _message(message: ChatMessage, index: int) -> dict[str, Any]:
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.type in ("text", "input_text"):
                texts.append(part.text or "")
            else:
                raise InhouseError(
                    ErrorCode.UNSUPPORTED,
                    f"content parts of type '{part.type}' are not supported by this model; send text only",
                    param=f"messages.{index}.content",
                )
        content = "".join(texts)
    out: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role, "content": content or ""}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = message.tool_calls
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def chat_requests(body: ChatCompletionRequest, defaults: SamplingDefaults, request_id: str) -> list[GenerateRequest]:
    messages = tuple(_message(m, i) for i, m in enumerate(body.messages))
    top = body.top_logprobs or 0
    if top and not body.logprobs:
        raise InhouseError(ErrorCode.INVALID_REQUEST, "top_logprobs requires logprobs to be true", param="top_logprobs")
    return [
        GenerateRequest(
            request_id=f"{request_id}-{i}",
            sampling=_sampling(body, defaults, body.logprobs, top, i),
            messages=messages,
            tools=tuple(body.tools) if body.tools else None,
            chat_template_kwargs=dict(body.chat_template_kwargs or {}),
        )
        for i in range(body.n)
    ]


def completion_requests(body: CompletionRequest, defaults: SamplingDefaults, request_id: str) -> list[GenerateRequest]:
    wants = body.logprobs is not None
    out = []
    for p, prompt in enumerate(body.prompts()):
        for i in range(body.n):
            index = p * body.n + i
            out.append(
                GenerateRequest(
                    request_id=f"{request_id}-{index}",
                    sampling=_sampling(body, defaults, wants, body.logprobs or 0, index),
                    prompt=prompt,
                )
            )
    return out
