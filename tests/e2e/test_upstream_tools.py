"""Tool calls, reasoning, images and structured output through an upstream, with real processes: a fault upstream
(tests/fault_upstream.py) scripted to answer with tool calls and thinking, the inhouse under test in front of
it, and the official ``openai`` SDK as the client.

What the client sends (tools, tool_choice, parallel_tool_calls, response_format, image parts, a tool-call round
trip) reaches the upstream intact; what the upstream answers (tool calls in pieces, in parallel, whole, without
``index``; ``reasoning_content`` or ``reasoning``) reaches the client in OpenAI's shapes, blocking and streamed;
and a model without ``vision`` refuses images before any upstream sees them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.helpers import assert_error
from tests.e2e.test_gateway import Upstream
from tests.process import ServerProcess

IMAGE = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJ"
         "RU5ErkJggg==")
WEATHER: Any = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
TIME: Any = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}}}}
SCHEMA: Any = {"type": "json_schema", "json_schema": {"name": "weather", "strict": True, "schema": {
    "type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}}}
MESSAGES: list[Any] = [
    {"role": "system", "content": "Use tools when they are relevant."},
    {"role": "user", "content": [{"type": "text", "text": "What's the weather where this photo was taken?"},
                                 {"type": "image_url", "image_url": {"url": IMAGE}}]},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "call_8296", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
    {"role": "tool", "content": '{"temperature_c": 21, "condition": "sunny"}', "tool_call_id": "call_8296"},
]
WEATHER_ARGS, TIME_ARGS = '{"city": "Paris"}', '{"zone": "CET"}'
THOUGHT = "Let me think"


@pytest.fixture(scope="module")
def upstreams(logs_dir: Path) -> Iterator[dict[str, Upstream]]:
    ups = {name: Upstream(name, logs_dir).start() for name in ("seeing", "blind")}
    yield ups
    for up in ups.values():
        up.stop()


@pytest.fixture(scope="module")
def server(upstreams: dict[str, Upstream], tmp_path_factory: pytest.TempPathFactory, cache_dir: Path,
           logs_dir: Path) -> Iterator[ServerProcess]:
    seeing, blind = upstreams["seeing"].url + "/v1", upstreams["blind"].url + "/v1"
    config = tmp_path_factory.mktemp("upstream-tools") / "inhouse.yaml"
    config.write_text(f"""
models:
  - {{name: seeing, engine: upstream, base_url: "{seeing}", upstream_model: up-model,
     capabilities: [chat, tools, vision]}}
  - {{name: blind, engine: upstream, base_url: "{blind}", upstream_model: up-model, capabilities: [chat, tools]}}
""", encoding="utf-8")
    with ServerProcess(["--config", str(config)], cache_dir, logs_dir / "upstream-tools.log") as process:
        yield process


@pytest.fixture
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30) as sdk:
        yield sdk


def test_tools_choice_format_and_images_reach_the_upstream_intact(
    client: openai.OpenAI, upstreams: dict[str, Upstream]
) -> None:
    up = upstreams["seeing"]
    asked: dict[str, Any] = {"tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                             "parallel_tool_calls": False, "response_format": SCHEMA}
    for stream in (False, True):
        if stream:
            chunks = client.chat.completions.create(model="seeing", messages=MESSAGES, tools=[WEATHER, TIME],
                                                    stream=True, **asked)
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            answer = client.chat.completions.create(model="seeing", messages=MESSAGES, tools=[WEATHER, TIME], **asked)
            assert answer.choices[0].message.content
        body = up.log()[-1]["body"]
        assert body["model"] == "up-model" and body["stream"] is True  # blocking clients are streamed upstream
        assert body["tools"] == [WEATHER, TIME]
        assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
        assert body["parallel_tool_calls"] is False and body["response_format"] == SCHEMA
        assert body["messages"] == MESSAGES  # the image part, the assistant's tool_calls and the tool_call_id


def test_a_model_without_vision_refuses_images_before_the_upstream(
    server: ServerProcess, upstreams: dict[str, Upstream]
) -> None:
    before = len(upstreams["blind"].log())
    for stream in (False, True):
        r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                       json={"model": "blind", "messages": MESSAGES, "stream": stream})
        assert_error(r, 400, "unsupported_feature", "messages.1.content")
    text = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={"model": "blind", "messages": text})
    assert r.status_code == 200, r.text  # text parts alone are fine
    assert len(upstreams["blind"].log()) == before + 1


def _arguments(tool_calls: list[Any]) -> list[tuple[str, str, str]]:
    return [(call.id, call.function.name, call.function.arguments) for call in tool_calls]


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_a_blocking_client_gets_tool_calls_and_reasoning(
    client: openai.OpenAI, upstreams: dict[str, Upstream], field: str
) -> None:
    upstreams["seeing"].script({"tool_calls": "parallel", "reasoning": field})
    answer = client.chat.completions.create(model="seeing", messages=MESSAGES, tools=[WEATHER, TIME])
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    assert all(call.type == "function" for call in choice.message.tool_calls)
    assert _arguments(choice.message.tool_calls) == [("call_1", "get_weather", WEATHER_ARGS),
                                                     ("call_2", "get_time", TIME_ARGS)]
    message = choice.message.model_dump()
    assert message["reasoning_content"] == THOUGHT and message["reasoning"] == THOUGHT
    assert THOUGHT not in (choice.message.content or "")


@pytest.mark.parametrize("kind", ["pieces", "parallel", "whole", "no_index"])
def test_a_streaming_client_gets_tool_calls_in_openai_pieces(
    client: openai.OpenAI, upstreams: dict[str, Upstream], kind: str
) -> None:
    upstreams["seeing"].script({"tool_calls": kind, "reasoning": "reasoning"})
    stream = client.chat.completions.create(model="seeing", messages=MESSAGES, tools=[WEATHER, TIME], stream=True)
    chunks = [c.model_dump() for c in stream]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    thought = "".join(d.get("reasoning_content") or "" for d in deltas)
    assert thought == THOUGHT and "".join(d.get("reasoning") or "" for d in deltas) == THOUGHT
    assert not "".join(d.get("content") or "" for d in deltas)
    pieces = [call for d in deltas for call in d.get("tool_calls") or []]
    calls: list[dict[str, str]] = []
    for piece in pieces:  # OpenAI's form: index, id, type and name first, then only index and arguments
        if piece.get("id"):
            assert piece["index"] == len(calls) and piece["type"] == "function" and piece["function"]["name"]
            calls.append({"id": piece["id"], "name": piece["function"]["name"], "arguments": ""})
        else:
            assert piece["index"] == len(calls) - 1 and not piece["function"].get("name")
        calls[-1]["arguments"] += piece["function"].get("arguments") or ""
    expected = [("call_1", "get_weather", WEATHER_ARGS)] + ([("call_2", "get_time", TIME_ARGS)]
                                                            if kind == "parallel" else [])
    assert [(c["id"], c["name"], c["arguments"]) for c in calls] == expected
    assert all(json.loads(c["arguments"]) for c in calls)
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "tool_calls"
