"""One choice's parsers chained over its Deltas: the reasoning parser first, the tool parser on its content.

Owns what the parsing keeps of a Delta (token count, logprobs, usage, the reasoning and tool call pieces an engine
already split) and what it changes: the text split into content, reasoning and tool calls, and the finish reason
``"tool_calls"`` once the choice called a tool.  Which parsers a request gets is decided here too.
"""

from __future__ import annotations

from typing import Any, Protocol

from inhouse.engine.answer_schema import CONSTRAINED_JSON
from inhouse.engine.base import Delta, EngineInfo, GenerateRequest, ToolCallDelta
from inhouse.server.parsers.envelope import EnvelopeParser
from inhouse.server.parsers.hermes import HermesParser
from inhouse.server.parsers.json_calls import Llama3JsonParser, MistralParser
from inhouse.server.parsers.think import ThinkParser

__all__ = ["ChoiceParser", "ReasoningParser", "ToolParser", "choice_parser"]


class ReasoningParser(Protocol):
    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) of the text given so far."""

    def finish(self) -> tuple[str, str]: ...


class ToolParser(Protocol):
    calls: int

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """(content, tool call pieces) of the text given so far."""

    def finish(self) -> tuple[str, list[ToolCallDelta]]: ...


_TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesParser, "llama3_json": Llama3JsonParser, "mistral": MistralParser,
    CONSTRAINED_JSON: EnvelopeParser,
}


class ChoiceParser:
    def __init__(self, reasoning: ReasoningParser | None, tools: ToolParser | None) -> None:
        self._reasoning = reasoning
        self._tools = tools

    def __call__(self, delta: Delta) -> Delta:
        final = delta.finish_reason is not None
        reasoning, content = "", delta.text
        if self._reasoning is not None:
            reasoning, content = self._reasoning.feed(delta.text)
            if final:
                more_reasoning, more_content = self._reasoning.finish()
                reasoning, content = reasoning + more_reasoning, content + more_content
        pieces: list[ToolCallDelta] = []
        if self._tools is not None:
            content, pieces = self._tools.feed(content)
            if final:
                more_content, more_pieces = self._tools.finish()
                content, pieces = content + more_content, pieces + more_pieces
        called = self._tools is not None and self._tools.calls > 0
        return Delta(
            text=content,
            token_count=delta.token_count,
            logprobs=delta.logprobs,
            finish_reason="tool_calls" if final and called else delta.finish_reason,
            usage=delta.usage,
            reasoning=delta.reasoning + reasoning,
            tool_calls=(delta.tool_calls or []) + pieces or None,
        )


def choice_parser(info: EngineInfo, request: GenerateRequest) -> ChoiceParser | None:
    """The parser for one choice of ``request`` on an engine described by ``info``, or None (text as it comes).

    Tool calls are read only when the request has tools and did not say ``tool_choice: "none"``; thinking is read
    unless the request turned it off (``chat_template_kwargs.enable_thinking: false``: the answer is passed as is).
    """
    tools: ToolParser | None = None
    if info.tool_parser in _TOOL_PARSERS and request.tools and request.tool_choice != "none":
        tools = _TOOL_PARSERS[info.tool_parser]()
    reasoning: ReasoningParser | None = None
    if info.reasoning_parser in ("think", "think_open") and not _thinking_off(request.chat_template_kwargs):
        reasoning = ThinkParser(opened=info.reasoning_parser == "think_open")
    return ChoiceParser(reasoning, tools) if tools is not None or reasoning is not None else None


def _thinking_off(kwargs: dict[str, Any]) -> bool:
    return kwargs.get("enable_thinking") is False or kwargs.get("thinking") is False
