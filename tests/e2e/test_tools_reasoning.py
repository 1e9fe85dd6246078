"""Tool calls and thinking through the real CLI: scripted fake models whose replies carry Hermes and ``<think>``
markup (read by the parsers their specs name) checked with the OpenAI SDK and as raw SSE, and a tiny real model
with a Hermes-style chat template that renders tools and a whole tool round trip."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from inhouse.protocol.responses import ChatCompletion, ChatCompletionChunk
from tests.e2e.helpers import SSEResult, stream
from tests.process import ServerProcess
from tests.tiny_model import build_tiny_hermes

REPLY = ('<think>\nThe user wants the weather.\n</think>\n\nChecking. <tool_call>\n{"name": "get_weather", '
         '"arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "now"}\n</tool_call>')
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                     "unit": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}},
]
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]
ROUND_TRIP = [
    {"role": "system", "content": "Use tools when they are relevant."},
    *ASK,
    {"role": "assistant", "content": "", "tool_calls": [{"id": "call_8296", "type": "function", "function": {
        "name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}}]},
    {"role": "tool", "content": "{\"city\": \"Paris\", \"temperature_c\": 21}", "tool_call_id": "call_8296"},
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, logs_dir: Path) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("tools")
    hermes = build_tiny_hermes(cache_dir / "tiny-hermes-h64-2k")
    config = {"models": [
        {"name": "agent", "path": "unused", "engine": "fake", "fake_reply": REPLY, "tool_parser": "hermes",
         "reasoning_parser": "think"},
        {"name": "thinker", "path": "unused", "engine": "fake", "reasoning_parser": "think_open",
         "fake_reply": "Paris is the capital.\n</think>\n\nParis."},
        {"name": "caller", "path": "unused", "engine": "fake", "tool_parser": "hermes",
         "fake_reply": '\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>\n'},
        {"name": "tiny-hermes", "engine": "transformers", "path": str(hermes), "dtype": "float32"},
    ]}
    (folder / "inhouse.yaml").write_text(json.dumps(config), encoding="utf-8")  # YAML reads JSON
    with ServerProcess(["--config", str(folder / "inhouse.yaml")], cache_dir, logs_dir / "tools.log",
                       state_dir=folder / "state") as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def test_blocking_tool_calls_and_reasoning(client: openai.OpenAI, http: httpx.Client) -> None:
    result = client.chat.completions.create(model="agent", messages=ASK, tools=TOOLS)  # type: ignore[arg-type]
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking."
    calls = choice.message.tool_calls or []
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in calls] == [  # type: ignore[union-attr]
        ("function", "get_weather", {"city": "Paris", "unit": "celsius"}), ("function", "now", {})]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    extra = choice.message.model_extra or {}
    assert extra["reasoning_content"] == extra["reasoning"] == "The user wants the weather."
    assert result.usage is not None and result.usage.completion_tokens == len(REPLY.split())
    raw = http.post("/v1/chat/completions", json={"model": "agent", "messages": ASK, "tools": TOOLS}).json()
    ChatCompletion.model_validate(raw)  # the documented shape, field for field


def test_only_tool_calls_makes_content_null(http: httpx.Client) -> None:
    raw = http.post("/v1/chat/completions", json={"model": "caller", "messages": ASK, "tools": TOOLS}).json()
    message = raw["choices"][0]["message"]
    assert message["content"] is None and message["tool_calls"][0]["function"] == {"name": "now", "arguments": "{}"}
    assert "reasoning" not in message and raw["choices"][0]["finish_reason"] == "tool_calls"
    ChatCompletion.model_validate(raw)


def test_stopped_before_a_call_is_text(http: httpx.Client) -> None:
    raw = http.post("/v1/chat/completions", json={"model": "agent", "messages": ASK, "tools": TOOLS,
                                                  "stop": ["Checking."]}).json()
    assert raw["choices"][0]["message"]["content"] == ""
    assert raw["choices"][0]["finish_reason"] == "stop"


def test_streaming_tool_calls_with_the_sdk(client: openai.OpenAI) -> None:
    calls: dict[int, dict[str, str]] = {}
    content, reasoning, finish = "", "", None
    with client.chat.completions.create(model="agent", messages=ASK, tools=TOOLS, stream=True,  # type: ignore[call-overload]
                                        stream_options={"include_usage": True}) as chunks:
        for chunk in chunks:
            for choice in chunk.choices:
                delta = choice.delta
                content += delta.content or ""
                reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
                for piece in delta.tool_calls or ():
                    call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
                    call["id"] += piece.id or ""
                    if piece.function is not None:
                        call["name"] += piece.function.name or ""
                        call["arguments"] += piece.function.arguments or ""
                finish = choice.finish_reason or finish
    assert (content, reasoning, finish) == ("Checking.", "The user wants the weather.", "tool_calls")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}), ("now", {})]
    assert all(c["id"].startswith("call_") and len(c["id"]) == 29 for c in calls.values())


def _dify_tool_calls(result: SSEResult) -> list[dict[str, str]]:
    """Dify's ``_increase_tool_call``: pieces are matched by id; a piece without one extends the last call."""
    calls: list[dict[str, str]] = []
    for chunk in result.events:
        for choice in chunk["choices"][:1]:
            for piece in choice.get("delta", {}).get("tool_calls") or ():
                function = piece.get("function") or {}
                if piece.get("id") and all(c["id"] != piece["id"] for c in calls):
                    calls.append({"id": piece["id"], "name": "", "arguments": ""})
                call = next(c for c in calls if c["id"] == piece["id"]) if piece.get("id") else calls[-1]
                call["name"] = function.get("name") or call["name"]
                call["arguments"] += function.get("arguments") or ""
    return calls


def test_stream_framing(http: httpx.Client) -> None:
    result = stream(http, "/v1/chat/completions", {"model": "agent", "messages": ASK, "tools": TOOLS,
                                                   "stream_options": {"include_usage": True}})
    assert result.status == 200 and result.done
    for chunk in result.events:
        ChatCompletionChunk.model_validate(chunk)
    deltas = [c["delta"] for e in result.events for c in e["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    for delta in deltas:  # thinking never shares a chunk with the answer
        assert not ("reasoning_content" in delta and ("content" in delta or "tool_calls" in delta))
        if "reasoning_content" in delta:
            assert delta["reasoning"] == delta["reasoning_content"] != ""
    pieces = [p for d in deltas for p in d.get("tool_calls", ())]
    assert pieces[0] == {"index": 0, "id": pieces[0]["id"], "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}
    assert pieces[1] == {"index": 0, "function": {"arguments": '{"city": "Paris", "unit": "celsius"}'}}
    assert [p["index"] for p in pieces] == [0, 0, 1, 1]
    assert result.finish_reasons == ["tool_calls"]
    assert result.events[-1]["choices"] == [] and result.usage is not None
    assert result.usage["completion_tokens"] == len(REPLY.split())
    assert [(c["name"], json.loads(c["arguments"])) for c in _dify_tool_calls(result)] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}), ("now", {})]


@pytest.mark.parametrize("extra", [{}, {"tool_choice": "none", "tools": TOOLS}])
def test_without_tools_the_markup_is_content(http: httpx.Client, extra: dict[str, Any]) -> None:
    raw = http.post("/v1/chat/completions", json={"model": "agent", "messages": ASK, **extra}).json()
    message = raw["choices"][0]["message"]
    assert raw["choices"][0]["finish_reason"] == "stop" and "tool_calls" not in message
    assert message["content"].startswith("Checking. <tool_call>") and message["content"].endswith("</tool_call>")
    assert message["reasoning_content"] == "The user wants the weather."


def test_thinking_opened_by_the_prompt(client: openai.OpenAI, http: httpx.Client) -> None:
    result = client.chat.completions.create(model="thinker", messages=ASK)  # type: ignore[arg-type]
    assert result.choices[0].message.content == "Paris."
    assert (result.choices[0].message.model_extra or {})["reasoning"] == "Paris is the capital."
    raw = http.post("/v1/chat/completions", json={"model": "thinker", "messages": ASK,
                                                  "chat_template_kwargs": {"enable_thinking": False}}).json()
    assert raw["choices"][0]["message"]["content"].endswith("</think>\n\nParis.")  # thinking off: as it came
    assert "reasoning" not in raw["choices"][0]["message"]


def test_tiny_model_card_lists_tools(http: httpx.Client) -> None:
    cards = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert "tools" in cards["tiny-hermes"]["capabilities"]
    assert "tools" in cards["agent"]["capabilities"]
    assert "tools" not in cards["thinker"]["capabilities"]


@pytest.mark.parametrize("messages", [ASK, ROUND_TRIP], ids=["ask", "round-trip"])
def test_tiny_model_renders_tools_and_a_round_trip(http: httpx.Client, messages: list[dict[str, Any]]) -> None:
    body = {"model": "tiny-hermes", "messages": messages, "tools": TOOLS, "tool_choice": "auto", "max_tokens": 8,
            "temperature": 0}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    ChatCompletion.model_validate(response.json())
    without = http.post("/v1/chat/completions", json={**body, "tools": None}).json()
    assert response.json()["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"]  # the tools were rendered
    streamed = stream(http, "/v1/chat/completions", body)
    assert streamed.status == 200 and streamed.done
    for chunk in streamed.events:
        ChatCompletionChunk.model_validate(chunk)
