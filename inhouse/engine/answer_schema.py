"""What a request's answer must look like, as one JSON schema an engine enforces by constrained decoding.

Owns two sources of that schema: ``response_format`` (``json_object``: any object; ``json_schema``: its schema)
and, for a model whose chat template knows no tools (``tool_parser: constrained_json``), the *tools envelope*:
the answer is one JSON value, either a call ``{"<tool name>": {<arguments>}}`` to a declared tool, with arguments
valid against that tool's parameters, or ``{"content": ...}``, a plain answer (a string, or the ``response_format``
value when the request has one too).  The tool's name is the first thing the model writes, so the choice between
calling and answering is made on a word that means something (measured on SmolLM2-135M: a ``"tool_calls"`` key
first made it call a tool for every question).  ``tool_choice: "required"`` leaves only calls, a named function
only calls to it.  One call per answer, unless the request set ``parallel_tool_calls: true``: then a list of calls
(OpenAI's default is true, but a small model repeats its call until its tokens run out).

The prompt that describes the tools is ``inhouse.engine.tool_prompt``'s; reading the envelope back into content
and tool calls is the ``constrained_json`` parser's (``inhouse.server.parsers.envelope``).  Pure data: no
grammar engine, no tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from inhouse.engine.base import GenerateRequest
from inhouse.errors import ErrorCode, InhouseError

__all__ = ["CONSTRAINED_JSON", "AnswerSchema", "answer_schema", "just_answered", "offered_tools"]

CONSTRAINED_JSON = "constrained_json"  # the tool parser of a model whose template knows no tools
_SCHEMA_PARAM = "response_format.json_schema.schema"
_ANY_OBJECT: dict[str, Any] = {"type": "object"}
_NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True, slots=True)
class AnswerSchema:
    """The schema as compact JSON text (key order is the answer's order), and the request field it came from."""

    text: str
    param: str


def offered_tools(request: GenerateRequest) -> list[dict[str, Any]]:
    """The function definitions the model may call now, under the request's ``tool_choice`` (none for ``"none"``).

    Under ``auto``, a tool whose result the conversation has just received (the last turns are tool results) is
    not offered again in the next turn: a small model without tool training otherwise repeats the call it just
    made, and an agent loops until its step limit.  It may still call the other tools, or answer."""
    choice = request.tool_choice
    if not request.tools or choice == "none":
        return []
    functions = [t.get("function") or {} for t in request.tools]
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        return [f for f in functions if f.get("name") == name]
    if choice == "required":
        return functions
    answered = just_answered(request.messages or ())
    return [f for f in functions if f.get("name") not in answered]


def just_answered(messages: Sequence[dict[str, Any]]) -> set[str]:
    """The names of the tools whose results end the conversation."""
    results = 0
    for message in reversed(messages):
        if message.get("role") not in ("tool", "function"):
            break
        results += 1
    if not results:
        return set()
    before = messages[len(messages) - results - 1] if len(messages) > results else {}
    names = {(c.get("function") or {}).get("name") for c in before.get("tool_calls") or ()}
    names.add((before.get("function_call") or {}).get("name"))
    names.update(m.get("name") for m in messages[len(messages) - results:])
    return {n for n in names if isinstance(n, str)}


def answer_schema(request: GenerateRequest, tool_parser: str | None) -> AnswerSchema | None:
    """The schema ``request``'s answer must follow on an engine whose tool parser is ``tool_parser``; None: free."""
    content = _format_schema(request.response_format)
    if tool_parser != CONSTRAINED_JSON or not request.tools or request.tool_choice == "none":
        return None if content is None else AnswerSchema(_text(content), _SCHEMA_PARAM)
    offered = offered_tools(request)
    if any(f.get("name") == "content" for f in offered):
        raise InhouseError(ErrorCode.INVALID_REQUEST, "a tool named 'content' cannot be offered to this model: its "
                           "answers without a tool use that name (rename the tool)", param="tools")
    branches = [_call_schema(f) for f in offered]
    if branches and request.parallel_tool_calls is True:
        branches = [{"type": "array", "items": branches[0] if len(branches) == 1 else {"anyOf": branches},
                     "minItems": 1}]
    if request.tool_choice in (None, "auto"):
        branches.append({"type": "object", "properties": {"content": content or {"type": "string"}},
                         "required": ["content"], "additionalProperties": False})
    return AnswerSchema(_text(branches[0] if len(branches) == 1 else {"anyOf": branches}), "tools")


def _format_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return _ANY_OBJECT
    schema = ((response_format or {}).get("json_schema") or {}).get("schema", {})
    if not isinstance(schema, dict):
        raise InhouseError(ErrorCode.INVALID_REQUEST, "the schema must be a JSON object", param=_SCHEMA_PARAM)
    return schema


def _call_schema(function: dict[str, Any]) -> dict[str, Any]:
    """One call: ``{"<name>": {<arguments>}}`` (the tool's name first, so the model picks the tool as it starts)."""
    name = function.get("name")
    return {"type": "object", "properties": {name: _arguments_schema(function.get("parameters"))},
            "required": [name], "additionalProperties": False}


def _arguments_schema(parameters: Any) -> dict[str, Any]:
    """A tool's parameters as the arguments' schema: an object; no keys beyond the declared ones unless it says so
    (a small model otherwise invents arguments the tool cannot take)."""
    if not isinstance(parameters, dict) or not parameters:
        return _NO_ARGUMENTS
    schema = dict(parameters)
    schema.setdefault("type", "object")
    if schema.get("type") == "object" and "properties" in schema:
        schema.setdefault("additionalProperties", False)
    return schema


def _text(schema: dict[str, Any]) -> str:
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
