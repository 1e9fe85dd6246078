"""``/v1/chat/completions``: the request model and the response/chunk builders."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from inhouse.errors import ErrorCode, InhouseError
from inhouse.protocol.common import LogprobEntry, SamplingFields, WireModel
from inhouse.protocol.response_format import StructuredFields

__all__ = ["ChatCompletionRequest", "ChatMessage", "chat_chunk", "chat_completion", "chat_logprobs"]


class ContentPart(WireModel):
    type: str
    text: str | None = None
    image_url: dict[str, Any] | str | None = None  # {"url": "data:image/png;base64,..." or "https://..."}


class ChatMessage(WireModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None


class FunctionName(WireModel):
    name: str = Field(min_length=1)


class NamedToolChoice(WireModel):
    type: Literal["function"] = "function"
    function: FunctionName


class ChatCompletionRequest(SamplingFields, StructuredFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=128)] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: Annotated[list[dict[str, Any]], Field(max_length=128)] | None = None  # legacy: tools
    function_call: Literal["auto", "none"] | FunctionName | None = None  # legacy: tool_choice
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("tools")
    @classmethod
    def _function_tools(cls, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for i, tool in enumerate(tools or ()):
            function = tool.get("function")
            if tool.get("type", "function") != "function" or not isinstance(function, dict):
                raise ValueError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
            _check_function(function, f"tools[{i}].function")
        return tools

    @field_validator("functions")
    @classmethod
    def _legacy_functions(cls, functions: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for i, function in enumerate(functions or ()):
            _check_function(function, f"functions[{i}]")
        return functions

    @model_validator(mode="after")
    def _completion_tokens_alias(self) -> ChatCompletionRequest:
        # o1/o3/gpt-5-named models make Dify send max_completion_tokens instead (contract pitfall 22)
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    def tool_list(self) -> list[dict[str, Any]] | None:
        """``tools``, or the legacy ``functions`` as tools."""
        if self.tools:
            return self.tools
        if self.functions:
            return [{"type": "function", "function": f} for f in self.functions]
        return None

    def tool_choice_value(self) -> str | dict[str, Any] | None:
        """``tool_choice`` (or legacy ``function_call``) as OpenAI spells it; a named function must be a tool."""
        choice: str | dict[str, Any] | None
        if self.tool_choice is not None:
            choice = self.tool_choice if isinstance(self.tool_choice, str) else self.tool_choice.model_dump()
        elif self.function_call is not None:
            choice = (self.function_call if isinstance(self.function_call, str) else
                      {"type": "function", "function": {"name": self.function_call.name}})
        else:
            return None
        if isinstance(choice, dict):
            name = choice["function"]["name"]
            names = [t["function"]["name"] for t in self.tool_list() or ()]
            if name not in names:
                raise InhouseError(ErrorCode.INVALID_REQUEST, f"tool_choice names the function '{name}', which is "
                                   f"not among the tools ({', '.join(names) or 'none'})", param="tool_choice")
        elif choice == "required" and not self.tool_list():
            raise InhouseError(ErrorCode.INVALID_REQUEST, "tool_choice is 'required' but the request has no tools",
                               param="tool_choice")
        return choice


def _check_function(function: dict[str, Any], where: str) -> None:
    name = function.get("name")
    if not isinstance(name, str) or not name or len(name) > 64:
        raise ValueError(f"{where}.name must be a name of 1 to 64 characters")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise ValueError(f"{where}.parameters must be a JSON Schema object")


def chat_logprobs(entries: Sequence[LogprobEntry] | None) -> dict[str, Any] | None:
    if entries is None:
        return None
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": list(e.token.encode("utf-8")),
                "top_logprobs": [
                    {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))} for t, lp in e.top
                ],
            }
            for e in entries
        ]
    }


def chat_completion(
    request_id: str, created: int, model: str, choices: list[dict[str, Any]], usage: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage,
    }


def chat_chunk(
    request_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    include_usage_field: bool = False,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if usage is not None or include_usage_field:
        chunk["usage"] = usage
    return chunk
