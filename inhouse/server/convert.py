"""Wire → engine: turns validated protocol requests into engine GenerateRequests.

Wire types stop here.  What the request leaves out of the defaultable sampling fields gets the neutral value
and is named in ``SamplingParams.unset``: the engine that serves it fills in its model's configured
defaults (engine side of the seam, so each deployment applies its own).
"""

from __future__ import annotations

from typing import Any

from inhouse.engine.base import DEFAULTABLE, GenerateRequest, SamplingParams
from inhouse.errors import ErrorCode, InhouseError
from inhouse.protocol.chat import ChatCompletionRequest, ChatMessage
from inhouse.protocol.common import SamplingFields
from inhouse.protocol.completions import CompletionRequest

__all__ = ["chat_requests", "check_choices", "completion_requests", "images_in"]


def check_choices(n: int, prompts: int, limit: int) -> None:
    """400 when a call asks for more choices (``n`` × prompts) than ``max_choices`` allows."""
    if n * prompts > limit:
        what = f"n={n}" if prompts == 1 else f"{prompts} prompts × n={n}"
        raise InhouseError(ErrorCode.INVALID_REQUEST, f"this request asks for {n * prompts} choices ({what}); "
                           f"this server answers at most {limit} per request (max_choices)",
                           param="n" if prompts == 1 else "prompt")


def _sampling(body: SamplingFields, logprobs: bool, top_logprobs: int, index: int) -> SamplingParams:
    seed = body.seed + index if body.seed is not None else None
    return SamplingParams(
        max_tokens=body.max_tokens,
        temperature=body.temperature if body.temperature is not None else 1.0,
        top_p=body.top_p if body.top_p is not None else 1.0,
        top_k=max(body.top_k, 0) if body.top_k is not None else 0,
        seed=seed,
        stop=body.stop_list(),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=body.repetition_penalty if body.repetition_penalty is not None else 1.0,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens,
        unset=frozenset(name for name in DEFAULTABLE if getattr(body, name) is None),
    )


_TEXT_PARTS = ("text", "input_text")
_IMAGE_PARTS = ("image_url", "input_image")


def _message(message: ChatMessage, index: int) -> dict[str, Any]:
    """Text parts are joined into one string; a message with an image keeps its parts (only an engine that
    serves VISION takes them: ``images_in``)."""
    content: str | list[dict[str, Any]] | None = None
    if isinstance(message.content, list):
        parts = message.content
        for part in parts:
            if part.type not in _TEXT_PARTS + _IMAGE_PARTS:
                raise InhouseError(ErrorCode.UNSUPPORTED, f"content parts of type '{part.type}' are not supported; "
                                   "send text or image_url parts", param=f"messages.{index}.content")
            if part.type in _IMAGE_PARTS and not part.image_url:
                raise InhouseError(ErrorCode.INVALID_REQUEST, "an image_url part needs its image_url",
                                   param=f"messages.{index}.content")
        if any(part.type in _IMAGE_PARTS for part in parts):
            content = [{"type": "text", "text": part.text or ""} if part.type in _TEXT_PARTS else
                       {"type": "image_url", "image_url": part.image_url if isinstance(part.image_url, dict)
                        else {"url": part.image_url}} for part in parts]
        else:
            content = "".join(part.text or "" for part in parts)
    else:
        content = message.content
    out: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role, "content": content or ""}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = message.tool_calls
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def images_in(messages: tuple[dict[str, Any], ...]) -> int | None:
    """The index of the first message with an image part, or None."""
    return next((i for i, m in enumerate(messages) if isinstance(m.get("content"), list)), None)


def chat_requests(body: ChatCompletionRequest, request_id: str) -> list[GenerateRequest]:
    messages = tuple(_message(m, i) for i, m in enumerate(body.messages))
    tools = body.tool_list()
    tool_choice = body.tool_choice_value()
    response_format = body.answer_format()
    top = body.top_logprobs or 0
    if top and not body.logprobs:
        raise InhouseError(ErrorCode.INVALID_REQUEST, "top_logprobs requires logprobs to be true", param="top_logprobs")
    return [
        GenerateRequest(
            request_id=f"{request_id}-{i}",
            sampling=_sampling(body, body.logprobs, top, i),
            messages=messages,
            tools=tuple(tools) if tools else None,
            chat_template_kwargs=dict(body.chat_template_kwargs or {}),
            tool_choice=tool_choice,
            parallel_tool_calls=body.parallel_tool_calls,
            response_format=response_format,
        )
        for i in range(body.n)
    ]


def completion_requests(body: CompletionRequest, request_id: str) -> list[GenerateRequest]:
    wants = body.logprobs is not None
    response_format = body.answer_format()
    out = []
    for p, prompt in enumerate(body.prompts()):
        for i in range(body.n):
            index = p * body.n + i
            out.append(
                GenerateRequest(
                    request_id=f"{request_id}-{index}",
                    sampling=_sampling(body, wants, body.logprobs or 0, index),
                    prompt=prompt,
                    response_format=response_format,
                )
            )
    return out
