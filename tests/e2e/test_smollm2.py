"""The embedded default model, SmolLM2-135M-Instruct, answering for real through the real CLI."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import SMOL
from tests.e2e.helpers import parse_sse, stream
from tests.process import ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def http(smol_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=smol_server.url, timeout=120) as c:
        yield c


def test_sensible_answer_to_a_simple_question(smol_server: ServerProcess) -> None:
    with openai.OpenAI(base_url=smol_server.url + "/v1", api_key="x", max_retries=0) as client:
        r = client.chat.completions.create(
            model=SMOL, messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=30, temperature=0)
    assert "Paris" in (r.choices[0].message.content or "")
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and 0 < r.usage.completion_tokens < 30


def test_default_model_is_listed(http: httpx.Client) -> None:
    card = http.get("/v1/models").json()["data"][0]
    assert card["id"] == SMOL
    assert card["max_model_len"] == 8192


def test_chinese_stream_equals_blocking(http: httpx.Client) -> None:
    body = {"model": SMOL, "messages": [{"role": "user", "content": "Translate into Chinese: I love my family."}],
            "max_tokens": 60, "temperature": 0}
    blocking = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    streamed = stream(http, "/v1/chat/completions", body)
    assert streamed.text.encode() == blocking.encode()
    assert any(ord(ch) > 0x2E80 for ch in blocking), "expected non-ASCII output for this prompt"


_CUT_BODY = {"model": SMOL, "messages": [{"role": "user", "content": "请用中文回答：天空为什么是蓝色的？"}],
             "temperature": 0}


def _answer(body: dict) -> tuple[str, str, int]:  # type: ignore[type-arg]
    """A blocking answer's text, finish and completion tokens."""
    choice = body["choices"][0]
    return choice["message"]["content"], choice["finish_reason"], body["usage"]["completion_tokens"]


def _streamed(events: list[dict]) -> tuple[str, str, int]:  # type: ignore[type-arg]
    """A streamed answer's text, finish and completion tokens; no piece of it may be U+FFFD."""
    pieces = [e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]]
    assert all("\ufffd" not in p for p in pieces), pieces
    return "".join(pieces), events[-1]["choices"][0]["finish_reason"], events[-1]["usage"]["completion_tokens"]


def test_a_length_cut_inside_a_character_sends_no_replacement_character(http: httpx.Client) -> None:
    """A Chinese character is three bytes, often spread over two or three tokens: many of these limits fall inside a
    character.  Its started bytes are dropped (usage still counts them), never sent as U+FFFD, streamed or not.

    One request at a time, so that each is computed alone and greedy answers to different limits can be compared
    exactly: under concurrency a row's bf16 arithmetic depends on what shares its step (decoded alone or in a
    batch), so twins can part at a near-tie, as in vLLM; the next test covers the cut under concurrency."""
    limits = range(2, 18)
    blocking_answers = [_answer(http.post("/v1/chat/completions", json={**_CUT_BODY, "max_tokens": m}).json())
                        for m in limits]
    streamed_answers = [_streamed(stream(http, "/v1/chat/completions", {**_CUT_BODY, "max_tokens": m}).events)
                        for m in limits]
    assert streamed_answers == blocking_answers
    for max_tokens, (text, finish, tokens) in zip(limits, blocking_answers, strict=True):
        assert (finish, tokens) == ("length", max_tokens)
        assert "\ufffd" not in text, (max_tokens, text)
        assert blocking_answers[-1][0].startswith(text), "greedy answers to longer limits extend shorter ones"
    texts = [text for text, _, _ in blocking_answers]
    assert any(ord(ch) > 0x2E80 for ch in texts[-1]), ("expected a Chinese answer for this prompt", texts)
    assert len(set(texts)) < len(texts), "some limits should add no text: they end inside a character"


def test_length_cuts_under_concurrency_send_no_replacement_character(smol_server: ServerProcess) -> None:
    """The same cuts, 32 sequences in one batch: each answer is whole characters only, with the tokens it was
    charged for, whatever shares its steps."""
    limits = range(16, 32)

    async def streamed(c: httpx.AsyncClient, max_tokens: int) -> tuple[str, str, int]:
        async with c.stream("POST", "/v1/chat/completions",
                            json={**_CUT_BODY, "max_tokens": max_tokens, "stream": True}) as r:
            events, _, _ = parse_sse(await r.aread())
        return _streamed(events)

    async def blocking(c: httpx.AsyncClient, max_tokens: int) -> tuple[str, str, int]:
        return _answer((await c.post("/v1/chat/completions", json={**_CUT_BODY, "max_tokens": max_tokens})).json())

    async def run() -> list[tuple[str, str, int]]:
        async with httpx.AsyncClient(base_url=smol_server.url, timeout=120) as c:
            return list(await asyncio.gather(*(blocking(c, m) for m in limits), *(streamed(c, m) for m in limits)))

    answers = asyncio.run(run())
    for max_tokens, (text, finish, tokens) in zip([*limits, *limits], answers, strict=True):
        assert (finish, tokens) == ("length", max_tokens)
        assert "\ufffd" not in text, (max_tokens, text)
        assert any(ord(ch) > 0x2E80 for ch in text), "expected a Chinese answer for this prompt"


def test_eight_concurrent_streams_share_the_model(smol_server: ServerProcess, http: httpx.Client) -> None:
    """Continuous batching: 8 clients are decoded together, not one after another."""
    body = {"model": SMOL, "max_tokens": 48, "ignore_eos": True, "stream": True,
            "messages": [{"role": "user", "content": "Tell me a story about a robot."}]}
    peak = 0

    async def client(c: httpx.AsyncClient) -> dict:  # type: ignore[type-arg]
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            events = [json.loads(line[6:]) async for line in r.aiter_lines() if line.startswith("data: {")]
        # deltas merge when this client lags behind the engine, so the number of events varies; the
        # tokens each stream received (usage on the last chunk) and its finish do not
        return {"content_events": sum(1 for e in events if e["choices"] and e["choices"][0]["delta"].get("content")),
                "completion_tokens": events[-1]["usage"]["completion_tokens"],
                "finish": events[-1]["choices"][0]["finish_reason"]}

    async def watch(c: httpx.AsyncClient, done: asyncio.Event) -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, (await c.get("/health")).json()["models"][SMOL]["running"])
            await asyncio.sleep(0.05)

    async def run() -> list[dict]:  # type: ignore[type-arg]
        async with httpx.AsyncClient(base_url=smol_server.url, timeout=120) as c:
            done = asyncio.Event()
            watcher = asyncio.create_task(watch(c, done))
            counts = await asyncio.gather(*(client(c) for _ in range(8)))
            done.set()
            await watcher
            return list(counts)

    results = asyncio.run(run())
    assert all(r["completion_tokens"] == 48 and r["finish"] == "length" for r in results), results
    assert all(r["content_events"] >= 1 for r in results), results
    assert peak >= 6, f"only {peak} sequences ran at once"


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
PARIS = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_the_default_model_calls_a_tool_its_template_does_not_know(smol_server: ServerProcess) -> None:
    """SmolLM2's template has no tools: they are described in the system turn and the answer is held to the tools
    envelope by constrained decoding, so under ``tool_choice: auto`` the model calls get_weather for Paris."""
    with openai.OpenAI(base_url=smol_server.url + "/v1", api_key="x", max_retries=0) as client:
        r = client.chat.completions.create(model=SMOL, messages=PARIS, tools=[WEATHER_TOOL],  # type: ignore[list-item]
                                           temperature=0, max_tokens=60)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert len(calls) == 1 and calls[0].type == "function" and calls[0].id.startswith("call_")
    assert calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]


def test_the_default_models_tool_call_streams_in_openais_framing(http: httpx.Client) -> None:
    body = {"model": SMOL, "messages": PARIS, "tools": [WEATHER_TOOL], "temperature": 0, "max_tokens": 60,
            "stream": True}
    result = stream(http, "/v1/chat/completions", body)
    assert result.status == 200 and result.done
    assert result.text == ""  # none of the envelope's JSON leaks into content
    pieces = [p for e in result.events for c in e["choices"] for p in c["delta"].get("tool_calls", ())]
    first, rest = pieces[0], pieces[1:]
    assert first["index"] == 0 and first["id"].startswith("call_") and first["type"] == "function"
    assert first["function"]["name"] == "get_weather"
    assert rest and all(set(p) == {"index", "function"} and set(p["function"]) == {"arguments"} for p in rest)
    arguments = first["function"].get("arguments", "") + "".join(p["function"]["arguments"] for p in rest)
    assert json.loads(arguments) == {"city": "Paris"}
    assert result.finish_reasons == ["tool_calls"]


def test_after_the_tool_answers_the_default_model_answers_in_text(http: httpx.Client) -> None:
    """The agent's second turn: the call and its result are rendered as turns the template knows, get_weather is not
    offered again right after its result (a small model would repeat its call), and the answer is plain text."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [*PARIS, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 18, "sky": "sunny"}'}]
    for streamed in (False, True):
        body = {"model": SMOL, "messages": messages, "tools": [WEATHER_TOOL], "temperature": 0, "max_tokens": 60}
        if streamed:
            result = stream(http, "/v1/chat/completions", {**body, "stream": True})
            text, finish = result.text, result.finish_reasons[-1]
            assert not any(c["delta"].get("tool_calls") for e in result.events for c in e["choices"])
        else:
            message = http.post("/v1/chat/completions", json=body).json()["choices"][0]
            text, finish = message["message"]["content"], message["finish_reason"]
            assert "tool_calls" not in message["message"]
        assert finish == "stop" and text.strip() and not text.lstrip().startswith("{")


def test_a_required_call_names_the_tool_even_for_small_talk(http: httpx.Client) -> None:
    body = {"model": SMOL, "messages": [{"role": "user", "content": "Hello!"}], "tools": [WEATHER_TOOL],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "temperature": 0,
            "max_tokens": 60}
    choice = http.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    arguments = json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"])
    assert set(arguments) == {"city"} and isinstance(arguments["city"], str)
