"""The embedded default model, SmolLM2-135M-Instruct, answering for real through the real CLI."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import SMOL
from tests.e2e.helpers import stream
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


def test_a_length_cut_inside_a_character_sends_no_replacement_character(smol_server: ServerProcess) -> None:
    """A Chinese character is three bytes, often spread over two or three tokens: many of these limits fall inside a
    character.  Its started bytes are dropped (usage still counts them), never sent as U+FFFD, streamed or not."""
    limits = range(16, 32)  # one batch: 32 sequences at once
    body = {"model": SMOL, "messages": [{"role": "user", "content": "请用中文回答：天空为什么是蓝色的？"}],
            "temperature": 0}

    async def blocking(c: httpx.AsyncClient, max_tokens: int) -> tuple[str, str, int]:
        r = (await c.post("/v1/chat/completions", json={**body, "max_tokens": max_tokens})).json()
        return r["choices"][0]["message"]["content"], r["choices"][0]["finish_reason"], r["usage"]["completion_tokens"]

    async def streamed(c: httpx.AsyncClient, max_tokens: int) -> tuple[str, str, int]:
        async with c.stream("POST", "/v1/chat/completions",
                            json={**body, "max_tokens": max_tokens, "stream": True}) as r:
            events = [json.loads(line[6:]) async for line in r.aiter_lines() if line.startswith("data: {")]
        pieces = [e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]]
        assert all("\ufffd" not in p for p in pieces), pieces
        return "".join(pieces), events[-1]["choices"][0]["finish_reason"], events[-1]["usage"]["completion_tokens"]

    async def run() -> tuple[list[tuple[str, str, int]], list[tuple[str, str, int]]]:
        async with httpx.AsyncClient(base_url=smol_server.url, timeout=120) as c:
            answers = await asyncio.gather(*(blocking(c, m) for m in limits), *(streamed(c, m) for m in limits))
        return list(answers[: len(limits)]), list(answers[len(limits):])

    blocking_answers, streamed_answers = asyncio.run(run())
    assert streamed_answers == blocking_answers
    for max_tokens, (text, finish, tokens) in zip(limits, blocking_answers, strict=True):
        assert (finish, tokens) == ("length", max_tokens)
        assert "\ufffd" not in text, (max_tokens, text)
        assert blocking_answers[-1][0].startswith(text), "greedy answers to longer limits extend shorter ones"
    texts = [text for text, _, _ in blocking_answers]
    assert any(ord(ch) > 0x2E80 for ch in texts[0]), "expected a Chinese answer for this prompt"
    assert len(set(texts)) < len(texts), "some limits should add no text: they end inside a character"


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
