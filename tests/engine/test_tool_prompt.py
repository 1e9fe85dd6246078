"""The tools prompt of a template that knows no tools: the tools section in the system turn, past calls and answers
in envelope form, tool results as one user turn that names each tool; the request itself left as it was."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from inhouse.engine.base import GenerateRequest, SamplingParams
from inhouse.engine.tool_prompt import tool_messages

USER = {"role": "user", "content": "weather in Paris?"}
WEATHER: dict[str, Any] = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME: dict[str, Any] = {"type": "function", "function": {"name": "get_time", "description": "Now, in a zone"}}


def make(*messages: dict[str, Any], tools: tuple[dict[str, Any], ...] = (WEATHER, TIME),
         tool_choice: str | dict[str, Any] | None = None, parallel: bool | None = None) -> GenerateRequest:
    return GenerateRequest("r", SamplingParams(), messages=messages, tools=tools, tool_choice=tool_choice,
                           parallel_tool_calls=parallel)


def call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def system_text(messages: list[dict[str, Any]]) -> str:
    assert messages[0]["role"] in ("system", "developer")
    text = messages[0]["content"]
    assert isinstance(text, str)
    return text


# ---- the tools section ------------------------------------------------------------------------------------


def test_a_system_turn_is_inserted_when_there_is_none() -> None:
    out = tool_messages(make(USER))
    assert [m["role"] for m in out] == ["system", "user"]
    assert out[1] == USER
    section = system_text(out)
    assert "get_weather" in section and "get_time" in section
    assert "The weather in a city" in section
    assert '"required": ["city"]' in section  # each tool's parameters schema
    assert 'To answer without a tool, reply {"content": "<your answer>"}' in section
    assert 'To call a tool, reply {"<tool name>": {<the arguments>}}' in section


def test_each_tool_is_one_json_line() -> None:
    lines = system_text(tool_messages(make(USER))).splitlines()
    described = [json.loads(line) for line in lines if line.startswith('{"name"')]
    assert described == [
        {"name": "get_weather", "description": "The weather in a city",
         "parameters": WEATHER["function"]["parameters"]},
        {"name": "get_time", "description": "Now, in a zone", "parameters": {}},
    ]


@pytest.mark.parametrize("role", ["system", "developer"])
def test_the_section_is_appended_to_the_first_system_turn(role: str) -> None:
    out = tool_messages(make({"role": role, "content": "Be brief."}, USER))
    assert [m["role"] for m in out] == [role, "user"]
    text = system_text(out)
    assert text.startswith("Be brief.\n\n") and "get_weather" in text


def test_a_system_turn_of_parts_is_joined() -> None:
    system = {"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}],
              "name": "boss"}
    out = tool_messages(make(system, USER))
    assert system_text(out).startswith("Be brief.\n\nYou can call these tools")
    assert out[0]["name"] == "boss"  # the rest of the turn is kept


def test_a_later_system_turn_is_not_the_one() -> None:
    out = tool_messages(make(USER, {"role": "system", "content": "late"}))
    assert [m["role"] for m in out] == ["system", "user", "system"]
    assert out[2] == {"role": "system", "content": "late"}
    assert "get_weather" in system_text(out)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_required_and_named_say_call_a_tool(tool_choice: str | dict[str, Any]) -> None:
    section = system_text(tool_messages(make(USER, tool_choice=tool_choice)))
    assert 'Call a tool: {"<tool name>": {<the arguments>}}' in section
    assert "content" not in section


def test_a_named_function_describes_only_it() -> None:
    section = system_text(tool_messages(make(USER, tool_choice={"type": "function",
                                                                "function": {"name": "get_time"}})))
    assert "get_time" in section and "get_weather" not in section


def test_parallel_asks_for_a_list() -> None:
    section = system_text(tool_messages(make(USER, parallel=True)))
    assert 'To call a tool, reply [{"<tool name>": {<the arguments>}}, ...]' in section
    section = system_text(tool_messages(make(USER, parallel=True, tool_choice="required")))
    assert 'Call a tool: [{"<tool name>": {<the arguments>}}, ...]' in section


def test_when_every_tool_just_answered_only_an_answer_is_asked() -> None:
    messages = (USER, {"role": "assistant", "content": None,
                       "tool_calls": [call("a", "get_weather", '{"city": "Paris"}'), call("b", "get_time", "{}")]},
                {"role": "tool", "tool_call_id": "a", "content": "sunny"},
                {"role": "tool", "tool_call_id": "b", "content": "noon"})
    section = system_text(tool_messages(make(*messages)))
    assert section == 'Reply with one JSON object and nothing else: {"content": "<your answer>"}'


def test_a_tool_that_just_answered_is_not_described_again() -> None:
    messages = (USER, {"role": "assistant", "content": None, "tool_calls": [call("a", "get_weather", "{}")]},
                {"role": "tool", "tool_call_id": "a", "content": "sunny"})
    section = system_text(tool_messages(make(*messages)))
    assert "get_time" in section and "get_weather" not in section


# ---- past turns in envelope form --------------------------------------------------------------------------


def test_a_call_becomes_its_envelope() -> None:
    out = tool_messages(make(USER, {"role": "assistant", "content": None,
                                    "tool_calls": [call("a", "get_weather", '{"city": "Zürich"}')]}))
    assert out[2] == {"role": "assistant", "content": '{"get_weather": {"city": "Zürich"}}'}


def test_several_calls_become_a_list() -> None:
    out = tool_messages(make(USER, {"role": "assistant", "content": "",
                                    "tool_calls": [call("a", "get_weather", '{"city": "Paris"}'),
                                                   call("b", "get_time", "")]}))
    assert json.loads(out[2]["content"]) == [{"get_weather": {"city": "Paris"}}, {"get_time": {}}]


def test_arguments_that_are_not_json_are_kept_as_text() -> None:
    out = tool_messages(make(USER, {"role": "assistant", "tool_calls": [call("a", "get_weather", "city=Paris")]}))
    assert json.loads(out[2]["content"]) == {"get_weather": "city=Paris"}


def test_a_legacy_function_call_becomes_its_envelope() -> None:
    out = tool_messages(make(USER, {"role": "assistant", "content": None,
                                    "function_call": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}))
    assert json.loads(out[2]["content"]) == {"get_time": {"zone": "UTC"}}


def test_a_plain_answer_becomes_content() -> None:
    out = tool_messages(make(USER, {"role": "assistant", "content": 'It is "sunny".'}, USER))
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert json.loads(out[2]["content"]) == {"content": 'It is "sunny".'}
    parts = tool_messages(make(USER, {"role": "assistant", "content": [{"type": "text", "text": "a"},
                                                                        {"type": "text", "text": "b"}]}))
    assert json.loads(parts[2]["content"]) == {"content": "ab"}
    empty = tool_messages(make(USER, {"role": "assistant", "content": None}))
    assert json.loads(empty[2]["content"]) == {"content": ""}


# ---- tool results -----------------------------------------------------------------------------------------


def test_consecutive_results_are_one_user_turn_naming_each_tool() -> None:
    messages = (USER, {"role": "assistant", "content": None,
                       "tool_calls": [call("a", "get_weather", '{"city": "Paris"}'), call("b", "get_time", "{}")]},
                {"role": "tool", "tool_call_id": "a", "content": "sunny"},
                {"role": "tool", "tool_call_id": "b", "content": [{"type": "text", "text": "noon"}]},
                {"role": "assistant", "content": "Sunny at noon."}, {"role": "user", "content": "thanks"})
    out = tool_messages(make(*messages))
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert out[3] == {"role": "user", "content": "Result of get_weather: sunny\nResult of get_time: noon"}


def test_results_at_the_end_are_one_user_turn() -> None:
    messages = (USER, {"role": "assistant", "tool_calls": [call("a", "get_weather", "{}")]},
                {"role": "tool", "tool_call_id": "a", "content": "sunny"},
                {"role": "tool", "tool_call_id": "zzz", "content": "lost"})
    out = tool_messages(make(*messages))
    assert out[-1] == {"role": "user", "content": "Result of get_weather: sunny\nResult of the tool: lost"}
    assert len(out) == 4


def test_a_legacy_function_result_uses_its_name() -> None:
    messages = (USER, {"role": "assistant", "function_call": {"name": "get_time", "arguments": "{}"}},
                {"role": "function", "name": "get_time", "content": "noon"})
    assert tool_messages(make(*messages))[-1] == {"role": "user", "content": "Result of get_time: noon"}


def test_the_request_is_not_changed() -> None:
    system = {"role": "system", "content": "Be brief."}
    messages = (system, USER, {"role": "assistant", "tool_calls": [call("a", "get_weather", '{"city": "P"}')]},
                {"role": "tool", "tool_call_id": "a", "content": "sunny"})
    request = make(*messages)
    before = copy.deepcopy(request.messages)
    out = tool_messages(request)
    assert request.messages == before
    out[0]["content"] = "changed"
    out[1]["content"] = "changed"
    assert request.messages == before
