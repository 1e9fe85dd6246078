"""Tools offered to a model whose chat template knows none: the conversation rewritten so its template renders it.

Owns the system section that describes the tools offered now and the answer's JSON envelope
(``inhouse.engine.answer_schema`` defines and enforces it), and the turns a plain template cannot render: an
assistant turn that called tools becomes the envelope the model would have written (``{"<tool>": {...}}``, a list
for several calls), an earlier plain answer becomes ``{"content": ...}``, and
the results of tool calls (``role: tool``, legacy ``role: function``) become one user turn that names each tool.
The model thus sees its own past answers in the form it must answer in.  Pure data: no tokenizer, no template.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from inhouse.engine.answer_schema import offered_tools
from inhouse.engine.base import GenerateRequest

__all__ = ["tool_messages"]

_CALL = '{"<tool name>": {<the arguments>}}'
_CALLS = '[{"<tool name>": {<the arguments>}}, ...]'
_ANSWER = '{"content": "<your answer>"}'


def tool_messages(request: GenerateRequest) -> list[dict[str, Any]]:
    """``request.messages`` with the tools described in the system turn and every tool turn in envelope form."""
    section = _section(request)
    names = _call_names(request.messages or ())
    out: list[dict[str, Any]] = []
    results: list[str] = []  # consecutive tool results: one user turn (templates that want roles to alternate)
    for message in request.messages or ():
        role = message.get("role")
        if role in ("tool", "function"):
            name = message.get("name") or names.get(message.get("tool_call_id") or "", "the tool")
            results.append(f"Result of {name}: {_text(message.get('content'))}")
            continue
        if results:
            out.append({"role": "user", "content": "\n".join(results)})
            results = []
        if role == "assistant":
            out.append({"role": "assistant", "content": _envelope(message)})
        else:
            out.append(dict(message))
    if results:
        out.append({"role": "user", "content": "\n".join(results)})
    if out and out[0].get("role") in ("system", "developer"):
        out[0] = {**out[0], "content": _text(out[0].get("content")) + "\n\n" + section}
    else:
        out.insert(0, {"role": "system", "content": section})
    return out


def _section(request: GenerateRequest) -> str:
    functions = offered_tools(request)
    if not functions:  # every tool has just answered: the model answers with what it got
        return f"Reply with one JSON object and nothing else: {_ANSWER}"
    described = "\n".join(json.dumps({"name": f.get("name"), "description": f.get("description", ""),
                                      "parameters": f.get("parameters", {})}, ensure_ascii=False)
                          for f in functions)
    lines = ["You can call these tools (each with its arguments' JSON schema):", described,
             "Reply with JSON and nothing else."]
    call = _CALLS if request.parallel_tool_calls is True else _CALL
    call += ", for example " + _example(functions[0])  # measured: SmolLM2-135M calls far more reliably with one
    if request.tool_choice in (None, "auto"):
        lines += [f"To call a tool, reply {call}", f"To answer without a tool, reply {_ANSWER}"]
    else:
        lines.append(f"Call a tool: {call}")
    return "\n".join(lines)


def _example(function: dict[str, Any]) -> str:
    """A call of ``function`` with "..." for every argument: its shape, with no value a model could copy."""
    properties = (function.get("parameters") or {}).get("properties") or {}
    return json.dumps({function.get("name"): dict.fromkeys(properties, "...")}, ensure_ascii=False)


def _envelope(message: dict[str, Any]) -> str:
    """An assistant turn as the JSON the model answers in."""
    calls = message.get("tool_calls") or []
    if message.get("function_call"):
        calls = [{"function": message["function_call"]}]
    if not calls:
        return json.dumps({"content": _text(message.get("content"))}, ensure_ascii=False)
    listed = []
    for call in calls:
        function = call.get("function") or {}
        arguments: Any = function.get("arguments") or "{}"
        if isinstance(arguments, str):
            with contextlib.suppress(ValueError):  # else kept as the text the client sent
                arguments = json.loads(arguments)
        listed.append({function.get("name") or "tool": arguments})
    return json.dumps(listed[0] if len(listed) == 1 else listed, ensure_ascii=False)


def _call_names(messages: Any) -> dict[str, str]:
    """Each earlier call's id → its tool's name: a tool result names its call only by id."""
    names = {}
    for message in messages:
        for call in message.get("tool_calls") or ():
            if call.get("id"):
                names[call["id"]] = (call.get("function") or {}).get("name") or "the tool"
    return names


def _text(content: Any) -> str:
    """A message's content as text: a string, or a list of parts whose text parts are joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""
