"""Dify's function-calling agent against the real server, through Dify's own SDK (``OAICompatLargeLanguageModel``).

Scripted fake models emit Hermes ``<tool_call>`` markup and ``<think>`` blocks one word per token (so the JSON of
the arguments splits across deltas); the server parses them into OpenAI ``tool_calls`` / ``reasoning_content``,
and ``tests/e2e/dify_driver.py`` reads them back the way the plugin runtime does (shared/DIFY_CONTRACT.md §6-§10):
the tool offered as a ``PromptMessageTool`` through the daemon's ``ModelInvokeLLMRequest``, the credentials of a
model whose "Function calling" is set, the streamed deltas merged by the SDK's ``_increase_tool_call``, and the
agent's second turn (assistant message with the calls, then a ``ToolPromptMessage``) sent back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.dify import Dify
from tests.e2e.helpers import stream
from tests.process import ServerProcess

pytestmark = pytest.mark.slow

ASK = "What's the weather in Paris right now?"
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
REASONING = "The user wants the weather in Paris."
ANSWER = "It is sunny in Paris."
SENT_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name, e.g. Paris"}},
                   "required": ["city"]}}}
MODES = pytest.mark.parametrize("streamed", [False, True], ids=["blocking", "stream"])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, logs_dir: Path) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("dify-tools")
    config = {"models": [
        {"name": "caller", "path": "unused", "engine": "fake", "tool_parser": "hermes", "fake_reply": CALL},
        {"name": "thinker", "path": "unused", "engine": "fake", "reasoning_parser": "think",
         "fake_reply": f"<think>{REASONING}</think> {ANSWER}"},
        {"name": "thinking-caller", "path": "unused", "engine": "fake", "tool_parser": "hermes",
         "reasoning_parser": "think", "fake_reply": f"<think>{REASONING}</think> {CALL}"},
    ]}
    (folder / "inhouse.yaml").write_text(json.dumps(config), encoding="utf-8")  # YAML reads JSON
    with ServerProcess(["--config", str(folder / "inhouse.yaml")], cache_dir, logs_dir / "dify-tools.log",
                       state_dir=folder / "state") as s:
        yield s


def tools_run(dify: Dify, server: ServerProcess, model: str, streamed: bool, scenario: str = "tools",
              *options: str) -> dict[str, Any]:
    return dify.ok(scenario, server.url + "/v1", model, "--prompt", ASK, *(["--stream"] if streamed else []),
                   *options)


def only_request(result: dict[str, Any]) -> dict[str, Any]:
    assert len(result["wire"]) == 1, result["wire"]
    sent: dict[str, Any] = result["wire"][0]
    assert sent["status"] == 200, sent
    return sent


def assert_one_weather_call(result: dict[str, Any], legacy: bool = False) -> dict[str, Any]:
    """Exactly one call reaches the host, in one chunk, named, with an id and JSON arguments for Paris.  (A legacy
    ``function_call`` has no id in OpenAI's format: the SDK fills "" (blocking) or "tool_call_id" (streaming).)"""
    assert len(result["tool_calls"]) == 1, result["tool_calls"]
    assert len(result["tool_call_chunk_indexes"]) == 1
    call: dict[str, Any] = result["tool_calls"][0]
    assert call["name"] == "get_weather" and call["type"] == "function"
    assert call["id"] or legacy
    assert json.loads(call["arguments"]) == {"city": "Paris"}
    assert result["usage"] is not None
    return call


def raw_argument_fragments(sent: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """The server's own stream for the exact body Dify sent: every tool-call delta, and the reasoning text."""
    with httpx.Client(timeout=60) as client:
        result = stream(client, sent["url"], sent["body"])
    assert result.status == 200 and result.done
    pieces = [p for e in result.events for c in e["choices"] for p in c["delta"].get("tool_calls", ())]
    reasoning = "".join(c["delta"].get("reasoning_content") or "" for e in result.events for c in e["choices"])
    return pieces, reasoning


@MODES
def test_tool_call_reaches_dify(dify: Dify, server: ServerProcess, streamed: bool) -> None:
    result = tools_run(dify, server, "caller", streamed)
    call = assert_one_weather_call(result)
    assert result["estimations"] == 0
    sent = only_request(result)
    body = sent["body"]
    assert body["stream"] is streamed
    assert body["tools"] == [SENT_TOOL] and body["tool_choice"] == "auto"
    assert "functions" not in body and "function_call" not in body
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert result["text"] == ""  # only a call: no text, and no markup leaking into it
    if streamed:
        assert sent["response_content_type"].startswith("text/event-stream")
        assert result["finish_reason"] == "tool_calls"
        pieces, _ = raw_argument_fragments(sent)
        assert len(pieces) >= 1 and pieces[0]["id"] and pieces[0]["function"]["name"] == "get_weather"
        assert all(not p.get("id") or p["id"] == pieces[0]["id"] for p in pieces)  # one call, one id (§9)
        # Dify concatenates every fragment onto the one call: nothing duplicated, nothing missing
        assert "".join(p["function"].get("arguments") or "" for p in pieces) == call["arguments"]
        assert call["id"].startswith("call_")  # the server's id, kept (the replay draws a fresh one)
    else:
        message = sent["response_body"]["choices"][0]["message"]
        assert message["tool_calls"][0]["id"] == call["id"]
        assert message["tool_calls"][0]["function"]["arguments"] == call["arguments"]


@MODES
def test_agent_second_turn_renders(dify: Dify, server: ServerProcess, streamed: bool) -> None:
    result = tools_run(dify, server, "caller", streamed, "tools-round-trip")
    call = assert_one_weather_call(result["first"])
    assert len(result["wire"]) == 2 and [w["status"] for w in result["wire"]] == [200, 200]
    messages = result["wire"][1]["body"]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]
    assert messages[2]["tool_calls"] == [{"id": call["id"], "type": "function", "function": {
        "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]
    assert messages[2]["content"] == ""
    assert messages[3] == {"role": "tool", "tool_call_id": call["id"], "content": json.dumps(
        {"city": "Paris", "temperature_c": 21, "condition": "sunny"})}
    assert result["wire"][1]["body"]["tools"] == [SENT_TOOL]
    assert_one_weather_call(result)  # the scripted model answers with the same call again
    assert result["estimations"] == 0


def test_thinking_reaches_dify_wrapped(dify: Dify, server: ServerProcess) -> None:
    result = dify.ok("stream", server.url + "/v1", "thinker", "--prompt", ASK)
    sent = only_request(result)
    _, reasoning = raw_argument_fragments(sent)
    assert reasoning == REASONING
    # the SDK wraps reasoning_content deltas in <think>…</think> ahead of the content (§10)
    assert result["text"] == f"<think>\n{REASONING}\n</think>{ANSWER}"
    assert result["finish_reason"] == "stop" and result["estimations"] == 0


def test_thinking_blocking_gives_the_answer(dify: Dify, server: ServerProcess) -> None:
    result = dify.ok("blocking", server.url + "/v1", "thinker", "--prompt", ASK)
    assert result["text"] == ANSWER  # the SDK's blocking path ignores reasoning fields (§10)
    message = only_request(result)["response_body"]["choices"][0]["message"]
    assert message["reasoning_content"] == REASONING


@MODES
def test_thinking_then_tool_call(dify: Dify, server: ServerProcess, streamed: bool) -> None:
    result = tools_run(dify, server, "thinking-caller", streamed)
    assert_one_weather_call(result)
    assert result["text"] == (f"<think>\n{REASONING}\n</think>" if streamed else "")


def legacy_run(dify: Dify, server: ServerProcess, streamed: bool) -> dict[str, Any]:
    return tools_run(dify, server, "caller", streamed, "tools", "--function-calling-type", "function_call")


@MODES
def test_legacy_function_call_mode_sends_functions(dify: Dify, server: ServerProcess, streamed: bool) -> None:
    """``function_calling_type: function_call`` sends legacy ``functions`` (no ``function_call`` key) (§6)."""
    body = only_request(legacy_run(dify, server, streamed))["body"]
    assert "tools" not in body and "tool_choice" not in body and "function_call" not in body
    assert body["functions"] == [SENT_TOOL["function"]]


@MODES
def test_legacy_function_call_mode_reads_the_call(dify: Dify, server: ServerProcess, streamed: bool) -> None:
    """Legacy ``functions`` are answered with ``function_call`` (and finish ``function_call``), as OpenAI does: the
    only shape Dify's function_call mode reads.  They were answered with ``tool_calls``, and the call was lost."""
    result = legacy_run(dify, server, streamed)
    assert_one_weather_call(result, legacy=True)


@MODES
def test_the_default_model_runs_difys_agent_round_trip(dify: Dify, smol_server: ServerProcess, streamed: bool) -> None:
    """The embedded SmolLM2, whose template knows no tools, through Dify's function-calling agent: the first turn is
    a get_weather call for Paris, the second (the call and its result sent back) a plain answer, not the call again."""
    result = dify.ok("tools-round-trip", smol_server.url + "/v1", "smollm2-135m-instruct", "--prompt", ASK,
                     *(["--stream"] if streamed else []))
    assert_one_weather_call(result["first"])
    assert result["first"]["text"] == ""  # the envelope's JSON never reaches Dify as text
    assert result["tool_calls"] == [] and result["text"].strip()
    assert not result["text"].lstrip().startswith("{")
    assert [w["status"] for w in result["wire"]] == [200, 200]
