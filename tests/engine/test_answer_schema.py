"""The answer schema: response_format's schema, or the tools envelope of a model whose template knows no tools,
checked by validating real answers (and wrong ones) against the schema it produces."""

from __future__ import annotations

import json
from typing import Any

import jsonschema_rs
import pytest

from inhouse.engine.answer_schema import (
    CONSTRAINED_JSON,
    AnswerSchema,
    answer_schema,
    just_answered,
    offered_tools,
)
from inhouse.engine.base import GenerateRequest, SamplingParams
from inhouse.errors import ErrorCode, InhouseError

HI = ({"role": "user", "content": "what is the weather in Paris?"},)
WEATHER: dict[str, Any] = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                   "required": ["city"]}}}
TIME: dict[str, Any] = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                                       "required": ["zone"], "additionalProperties": True}}}
NOW: dict[str, Any] = {"type": "function", "function": {"name": "now"}}  # no parameters at all
PERSON: dict[str, Any] = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"],
                          "additionalProperties": False}


def make(tools: tuple[dict[str, Any], ...] | None = (WEATHER, TIME), tool_choice: str | dict[str, Any] | None = None,
         parallel: bool | None = None, response_format: dict[str, Any] | None = None,
         messages: tuple[dict[str, Any], ...] = HI) -> GenerateRequest:
    return GenerateRequest("r", SamplingParams(), messages=messages, tools=tools, tool_choice=tool_choice,
                           parallel_tool_calls=parallel, response_format=response_format)


def schema_of(request: GenerateRequest, tool_parser: str | None = CONSTRAINED_JSON) -> dict[str, Any]:
    schema = answer_schema(request, tool_parser)
    assert schema is not None
    loaded = json.loads(schema.text)
    assert isinstance(loaded, dict)
    return loaded


def valid(schema: dict[str, Any], answer: Any) -> bool:
    return bool(jsonschema_rs.is_valid(schema, answer))


def named(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


def called(*names: str) -> tuple[dict[str, Any], ...]:
    """A conversation where the assistant called ``names`` and each result came back."""
    calls = [{"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": "{}"}}
             for i, n in enumerate(names)]
    results = tuple({"role": "tool", "tool_call_id": f"call_{i}", "content": "42"} for i in range(len(names)))
    return (*HI, {"role": "assistant", "content": None, "tool_calls": calls}, *results)


# ---- the envelope under auto -------------------------------------------------------------------------------


def test_auto_accepts_one_call_or_a_content_answer() -> None:
    schema = schema_of(make())
    for answer in ({"get_weather": {"city": "Paris"}}, {"get_weather": {"city": "Paris", "unit": "c"}},
                   {"get_time": {"zone": "UTC"}}, {"content": "It is sunny."}):
        assert valid(schema, answer), answer


@pytest.mark.parametrize("answer", [
    {"get_wether": {"city": "Paris"}},  # a tool that was not declared
    {"get_weather": {"city": "Paris", "country": "FR"}},  # an argument the tool does not take
    {"get_weather": {"unit": "c"}},  # a required argument missing
    {"get_weather": {"city": 7}},  # an argument of the wrong type
    {"get_weather": {"city": "Paris"}, "get_time": {"zone": "UTC"}},  # two calls in one object
    [{"get_weather": {"city": "Paris"}}, {"get_time": {"zone": "UTC"}}],  # a list when parallel is not true
    [{"get_weather": {"city": "Paris"}}],  # even a list of one
    {"content": 42},  # content is a string without response_format
    {"content": "hi", "get_time": {"zone": "UTC"}},  # an answer and a call at once
    {},
    "It is sunny.",
], ids=["unknown_tool", "extra_argument", "missing_argument", "wrong_type", "two_keys", "list", "list_of_one",
        "content_not_string", "content_and_call", "empty_object", "bare_string"])
def test_auto_rejects(answer: Any) -> None:
    assert not valid(schema_of(make()), answer)


def test_a_tool_that_allows_more_arguments_keeps_that() -> None:
    assert valid(schema_of(make()), {"get_time": {"zone": "UTC", "format": "24h"}})


def test_the_schema_is_compact_and_comes_from_tools() -> None:
    schema = answer_schema(make(), CONSTRAINED_JSON)
    assert isinstance(schema, AnswerSchema) and schema.param == "tools"
    assert " " not in schema.text.replace("get weather", "")  # compact separators
    assert schema.text == json.dumps(json.loads(schema.text), separators=(",", ":"), ensure_ascii=False)


def test_the_tool_name_is_the_first_key_of_a_call() -> None:
    """The model writes the tool's name first: the call's only property is the name."""
    [call, _, _] = schema_of(make())["anyOf"]
    assert list(call["properties"]) == ["get_weather"] and call["required"] == ["get_weather"]


# ---- parallel calls ---------------------------------------------------------------------------------------


def test_parallel_true_takes_a_list_of_calls() -> None:
    schema = schema_of(make(parallel=True))
    assert valid(schema, [{"get_weather": {"city": "Paris"}}, {"get_time": {"zone": "UTC"}}])
    assert valid(schema, [{"get_weather": {"city": "Paris"}}])
    assert valid(schema, {"content": "no call"})
    assert not valid(schema, [])  # at least one call
    assert not valid(schema, {"get_weather": {"city": "Paris"}})  # a call is in a list then
    assert not valid(schema, [{"get_weather": {"city": "Paris"}}, {"content": "x"}])  # content is not a call
    assert not valid(schema, [{"get_weather": {"city": "Paris", "x": 1}}])


def test_parallel_with_one_tool() -> None:
    schema = schema_of(make(tools=(WEATHER,), parallel=True, tool_choice="required"))
    assert valid(schema, [{"get_weather": {"city": "A"}}, {"get_weather": {"city": "B"}}])
    assert not valid(schema, [{"get_time": {"zone": "UTC"}}])
    assert not valid(schema, {"content": "x"})


@pytest.mark.parametrize("parallel", [None, False])
def test_parallel_not_true_is_one_call(parallel: bool | None) -> None:
    schema = schema_of(make(parallel=parallel))
    assert valid(schema, {"get_weather": {"city": "Paris"}})
    assert not valid(schema, [{"get_weather": {"city": "Paris"}}])


# ---- tool_choice ------------------------------------------------------------------------------------------


def test_required_leaves_only_calls() -> None:
    schema = schema_of(make(tool_choice="required"))
    assert valid(schema, {"get_weather": {"city": "Paris"}})
    assert valid(schema, {"get_time": {"zone": "UTC"}})
    assert not valid(schema, {"content": "It is sunny."})


def test_a_named_function_leaves_only_calls_to_it() -> None:
    schema = schema_of(make(tool_choice={"type": "function", "function": {"name": "get_time"}}))
    assert valid(schema, {"get_time": {"zone": "UTC"}})
    assert not valid(schema, {"get_weather": {"city": "Paris"}})
    assert not valid(schema, {"content": "It is sunny."})


def test_explicit_auto_is_the_same_as_none_given() -> None:
    assert answer_schema(make(tool_choice="auto"), CONSTRAINED_JSON) == answer_schema(make(), CONSTRAINED_JSON)


def test_tool_choice_none_is_free_text() -> None:
    assert answer_schema(make(tool_choice="none"), CONSTRAINED_JSON) is None


def test_tool_choice_none_keeps_response_format() -> None:
    request = make(tool_choice="none", response_format={"type": "json_schema", "json_schema": {"schema": PERSON}})
    schema = answer_schema(request, CONSTRAINED_JSON)
    assert schema is not None and schema.param == "response_format.json_schema.schema"
    assert json.loads(schema.text) == PERSON


# ---- response_format inside the envelope ------------------------------------------------------------------


def test_response_format_is_the_content_value() -> None:
    schema = schema_of(make(response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}))
    assert valid(schema, {"content": {"name": "Ada"}})
    assert valid(schema, {"get_weather": {"city": "Paris"}})
    assert not valid(schema, {"content": "Ada"})
    assert not valid(schema, {"content": {"name": "Ada", "age": 3}})


def test_json_object_content_is_any_object() -> None:
    schema = schema_of(make(response_format={"type": "json_object"}))
    assert valid(schema, {"content": {"anything": [1, 2]}})
    assert not valid(schema, {"content": "text"})


def test_text_response_format_keeps_a_string_content() -> None:
    schema = schema_of(make(response_format={"type": "text"}))
    assert valid(schema, {"content": "hi"})
    assert not valid(schema, {"content": {"a": 1}})


# ---- other tool parsers: only response_format -------------------------------------------------------------


@pytest.mark.parametrize("tool_parser", ["hermes", None])
def test_a_tool_aware_template_is_not_constrained_by_tools(tool_parser: str | None) -> None:
    assert answer_schema(make(), tool_parser) is None
    request = make(response_format={"type": "json_schema", "json_schema": {"schema": PERSON}})
    schema = answer_schema(request, tool_parser)
    assert schema == AnswerSchema(json.dumps(PERSON, separators=(",", ":")), "response_format.json_schema.schema")


def test_no_tools_is_response_format_alone() -> None:
    assert answer_schema(make(tools=None), CONSTRAINED_JSON) is None
    assert answer_schema(make(tools=()), CONSTRAINED_JSON) is None
    schema = answer_schema(make(tools=None, response_format={"type": "json_object"}), CONSTRAINED_JSON)
    assert schema == AnswerSchema('{"type":"object"}', "response_format.json_schema.schema")


@pytest.mark.parametrize("tool_parser", [CONSTRAINED_JSON, "hermes"])
@pytest.mark.parametrize("bad", [["not", "an", "object"], "text", 3])
def test_a_schema_that_is_not_an_object_is_a_400(tool_parser: str, bad: Any) -> None:
    with pytest.raises(InhouseError) as refused:
        answer_schema(make(response_format={"type": "json_schema", "json_schema": {"schema": bad}}), tool_parser)
    assert refused.value.code is ErrorCode.INVALID_REQUEST and refused.value.status == 400
    assert refused.value.param == "response_format.json_schema.schema"


def test_a_json_schema_without_a_schema_is_any_json() -> None:
    schema = answer_schema(make(tools=None, response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
                           None)
    assert schema is not None and json.loads(schema.text) == {}


# ---- a tool named "content" -------------------------------------------------------------------------------


def test_a_tool_named_content_is_a_400() -> None:
    with pytest.raises(InhouseError) as refused:
        answer_schema(make(tools=(WEATHER, named("content"))), CONSTRAINED_JSON)
    assert refused.value.code is ErrorCode.INVALID_REQUEST and refused.value.status == 400
    assert refused.value.param == "tools"


def test_a_tool_named_content_is_fine_on_a_tool_aware_template() -> None:
    assert answer_schema(make(tools=(named("content"),)), "hermes") is None


# ---- parameters -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("parameters", [None, {}], ids=["missing", "empty"])
def test_a_tool_without_parameters_takes_an_empty_object(parameters: dict[str, Any] | None) -> None:
    function: dict[str, Any] = {"name": "now"}
    if parameters is not None:
        function["parameters"] = parameters
    schema = schema_of(make(tools=({"type": "function", "function": function},), tool_choice="required"))
    assert valid(schema, {"now": {}})
    assert not valid(schema, {"now": {"x": 1}})
    assert not valid(schema, {"now": []})
    assert schema["properties"]["now"] == {"type": "object", "properties": {}, "additionalProperties": False}


def test_parameters_with_properties_get_no_additional_properties() -> None:
    schema = schema_of(make(tools=(WEATHER,), tool_choice="required"))
    arguments = schema["properties"]["get_weather"]
    assert arguments["additionalProperties"] is False
    assert WEATHER["function"]["parameters"].get("additionalProperties") is None  # the request is not changed


def test_parameters_without_a_type_are_an_object() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": {"type": "integer"}}}}}
    schema = schema_of(make(tools=(tool,), tool_choice="required"))
    assert valid(schema, {"f": {"a": 1}})
    assert not valid(schema, {"f": {"a": 1, "b": 2}})
    assert not valid(schema, {"f": "a"})


# ---- tools that just answered -----------------------------------------------------------------------------


def test_a_tool_that_just_answered_is_not_offered_again_under_auto() -> None:
    schema = schema_of(make(messages=called("get_weather")))
    assert not valid(schema, {"get_weather": {"city": "Paris"}})
    assert valid(schema, {"get_time": {"zone": "UTC"}})
    assert valid(schema, {"content": "It is 42 degrees."})


def test_when_every_tool_just_answered_only_content_is_left() -> None:
    schema = schema_of(make(messages=called("get_weather", "get_time")))
    assert schema == {"type": "object", "properties": {"content": {"type": "string"}}, "required": ["content"],
                      "additionalProperties": False}


def test_when_every_tool_just_answered_parallel_is_still_only_content() -> None:
    schema = schema_of(make(messages=called("get_weather", "get_time"), parallel=True))
    assert valid(schema, {"content": "done"})
    assert not valid(schema, [{"get_time": {"zone": "UTC"}}])


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_required_and_named_still_offer_a_tool_that_just_answered(tool_choice: str | dict[str, Any]) -> None:
    schema = schema_of(make(messages=called("get_weather"), tool_choice=tool_choice))
    assert valid(schema, {"get_weather": {"city": "Paris"}})


def test_a_result_earlier_in_the_conversation_does_not_count() -> None:
    messages = (*called("get_weather"), {"role": "assistant", "content": "It is 42."},
                {"role": "user", "content": "and tomorrow?"})
    assert valid(schema_of(make(messages=messages)), {"get_weather": {"city": "Paris"}})


def test_just_answered_reads_calls_legacy_function_call_and_names() -> None:
    assert just_answered(called("get_weather", "get_time")) == {"get_weather", "get_time"}
    legacy = (*HI, {"role": "assistant", "content": None, "function_call": {"name": "get_time", "arguments": "{}"}},
              {"role": "function", "name": "get_time", "content": "12:00"})
    assert just_answered(legacy) == {"get_time"}
    named_only = (*HI, {"role": "tool", "name": "get_weather", "content": "sunny"})
    assert just_answered(named_only) == {"get_weather"}
    assert just_answered(HI) == set()
    assert just_answered(()) == set()
    assert just_answered((*called("get_weather"), {"role": "user", "content": "thanks"})) == set()


def test_offered_tools() -> None:
    names = [f["name"] for f in offered_tools(make(messages=called("get_time")))]
    assert names == ["get_weather"]
    assert offered_tools(make(tool_choice="none")) == []
    assert offered_tools(make(tools=None)) == []
    assert [f["name"] for f in offered_tools(make(tool_choice="required", messages=called("get_time")))] == [
        "get_weather", "get_time"]
    assert offered_tools(make(tool_choice={"type": "function", "function": {"name": "nope"}})) == []


def test_a_tool_named_content_that_just_answered_is_not_offered_so_no_400() -> None:
    """Only the tools offered now are checked for the name "content"."""
    schema = schema_of(make(tools=(WEATHER, named("content")), messages=called("content")))
    assert valid(schema, {"get_weather": {"city": "Paris"}})
