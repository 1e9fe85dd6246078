"""``/v1/completions``: the request model and the response/chunk builders."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import Field, field_validator

from inhouse.protocol.common import LogprobEntry, SamplingFields, TokenId
from inhouse.protocol.response_format import StructuredFields

__all__ = ["CompletionRequest", "completion", "completion_chunk", "completion_logprobs"]


class CompletionRequest(SamplingFields, StructuredFields):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: object) -> object:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        return value

    def prompts(self) -> list[str | tuple[int, ...]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [tuple(x for x in p if isinstance(x, int))]
        out: list[str | tuple[int, ...]] = []
        for x in p:
            out.append(x if isinstance(x, str) else tuple(x) if isinstance(x, list) else (x,))
        return out


def completion_logprobs(entries: Sequence[LogprobEntry] | None, offset: int) -> dict[str, Any] | None:
    if entries is None:
        return None
    offsets, position = [], offset
    for e in entries:
        offsets.append(position)
        position += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [dict(e.top) for e in entries],
        "text_offset": offsets,
    }


def completion(
    request_id: str, created: int, model: str, choices: list[dict[str, Any]], usage: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage,
    }


def completion_chunk(
    request_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    include_usage_field: bool = False,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if usage is not None or include_usage_field:
        chunk["usage"] = usage
    return chunk
