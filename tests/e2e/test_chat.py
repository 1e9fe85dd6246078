"""Chat completions on the tiny model through the real CLI: shapes, usage, streaming, sampling."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.conftest import TINY
from tests.e2e.helpers import stream
from tests.process import ServerProcess

CJK = [{"role": "user", "content": "你好，请用中文介绍一下北京。😀"}]


@pytest.fixture(scope="module")
def client(tiny_server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def http(tiny_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=tiny_server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_blocking_response_shape_and_exact_usage(client: openai.OpenAI, tokenizer) -> None:  # type: ignore[no-untyped-def]
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is the capital of France?"}]
    result = client.chat.completions.create(model=TINY, messages=messages, max_tokens=7, temperature=0)
    assert result.object == "chat.completion"
    assert result.id.startswith("chatcmpl-")
    assert result.model == TINY
    choice = result.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    expected_prompt = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                        return_dict=False))
    assert result.usage is not None
    assert result.usage.prompt_tokens == expected_prompt
    if choice.finish_reason == "length":
        assert result.usage.completion_tokens == 7
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_stream_framing_role_first_usage_last(http: httpx.Client) -> None:
    body = {"model": TINY, "messages": CJK, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    result = stream(http, "/v1/chat/completions", body)
    assert result.status == 200
    assert result.headers["content-type"].startswith("text/event-stream")
    assert result.headers.get("content-encoding") is None
    assert result.done
    first = result.events[0]
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert all("choices" in e for e in result.events)
    assert all(e["id"] == first["id"] for e in result.events)
    last = result.events[-1]
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["usage"]["completion_tokens"] == 12
    assert all("usage" not in e for e in result.events[:-1])
    # pieces are merged only when the client lags, and byte tokens wait for a whole character, so the count of
    # content events is not fixed here; the paced fake engine in test_cli checks one event per token
    assert 1 <= len([e for e in result.events if e["choices"][0]["delta"].get("content")]) <= 12


def test_stream_include_usage_sends_separate_usage_chunk(http: httpx.Client) -> None:
    body = {"model": TINY, "messages": CJK, "max_tokens": 5, "temperature": 0, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    result = stream(http, "/chat/completions", body)
    assert result.done
    *chunks, usage_chunk = result.events
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 5
    assert usage_chunk["usage"]["total_tokens"] == usage_chunk["usage"]["prompt_tokens"] + 5
    assert all(c["usage"] is None for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("seed", [None, 7])
def test_streamed_cjk_text_equals_blocking_byte_for_byte(client: openai.OpenAI, http: httpx.Client,
                                                         seed: int | None) -> None:
    """The random tiny model emits arbitrary byte tokens: streaming must never split a character."""
    sampling = {"temperature": 0} if seed is None else {"temperature": 1.0, "seed": seed}
    body = {"model": TINY, "messages": CJK, "max_tokens": 80, "ignore_eos": True, **sampling}
    blocking = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    streamed = stream(http, "/v1/chat/completions", body)
    pieces = [e["choices"][0]["delta"].get("content", "") for e in streamed.events if e["choices"]]
    assert "".join(pieces).encode() == blocking.encode()
    # the model's own invalid bytes show as U+FFFD inside a piece; a piece (or the answer, cut at max_tokens)
    # ending in U+FFFD would be a character split at the boundary, sent before its last bytes
    assert not any(p.endswith("\ufffd") for p in pieces), pieces
    assert len(blocking) > 0


def test_sync_sdk_streaming(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=TINY, messages=CJK, max_tokens=8, temperature=0, stream=True,
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    assert "".join(c.choices[0].delta.content or "" for c in chunks)


def test_seeded_sampling_is_reproducible_and_seed_matters(client: openai.OpenAI) -> None:
    def ask(seed: int) -> str:
        r = client.chat.completions.create(model=TINY, messages=CJK, max_tokens=30, temperature=1.0, seed=seed,
                                           extra_body={"ignore_eos": True})
        return r.choices[0].message.content or ""

    assert ask(11) == ask(11)
    assert ask(11) != ask(12)


def test_greedy_result_does_not_depend_on_batch(tiny_server: ServerProcess) -> None:
    """A greedy request gives the same tokens alone and inside a batch of sampled requests."""
    greedy = {"model": TINY, "messages": CJK, "max_tokens": 40, "temperature": 0, "ignore_eos": True}

    async def run() -> tuple[str, str]:
        async with httpx.AsyncClient(base_url=tiny_server.url, timeout=60) as c:
            alone = (await c.post("/v1/chat/completions", json=greedy)).json()
            others = [
                c.post("/v1/chat/completions", json={
                    "model": TINY, "max_tokens": 60, "temperature": t, "top_p": 0.9, "seed": i, "ignore_eos": True,
                    "messages": [{"role": "user", "content": "other prompt " * (i + 1)}]})
                for i, t in enumerate([0.5, 1.0, 1.5, 0.7, 1.2])
            ]
            together = await asyncio.gather(c.post("/v1/chat/completions", json=greedy), *others)
            return alone["choices"][0]["message"]["content"], together[0].json()["choices"][0]["message"]["content"]

    alone, batched = asyncio.run(run())
    assert alone == batched


def test_n_choices_and_async_streaming(tiny_server: ServerProcess) -> None:
    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=tiny_server.url + "/v1", api_key="x", max_retries=0)
        result = await client.chat.completions.create(model=TINY, messages=CJK, n=3, max_tokens=6, seed=3,
                                                      temperature=1.0, extra_body={"ignore_eos": True})
        assert [c.index for c in result.choices] == [0, 1, 2]
        assert result.usage is not None and result.usage.completion_tokens == 18
        chunks = await client.chat.completions.create(model=TINY, messages=CJK, max_tokens=6, stream=True,
                                                      stream_options={"include_usage": True},
                                                      extra_body={"ignore_eos": True})
        texts, usage = [], None
        async for chunk in chunks:
            if chunk.choices:
                texts.append(chunk.choices[0].delta.content or "")
            if chunk.usage:
                usage = chunk.usage
        assert usage is not None and usage.completion_tokens == 6
        assert "".join(texts)
        await client.close()

    asyncio.run(run())


def test_stop_string_across_token_boundaries(http: httpx.Client, tokenizer) -> None:  # type: ignore[no-untyped-def]
    base = {"model": TINY, "messages": CJK, "max_tokens": 60, "temperature": 0, "ignore_eos": True}
    full = http.post("/v1/chat/completions", json=base).json()["choices"][0]["message"]["content"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    # a stop string made of the tail of token 3 and the head of token 4: it spans a token boundary
    t3, t4 = tokenizer.decode(ids[3:4]), tokenizer.decode(ids[4:5])
    stop = (t3[-1:] + t4[:2]) if t3 and t4 else full[10:13]
    assert stop and stop in full
    expected = full[: full.index(stop)]
    blocking = http.post("/v1/chat/completions", json={**base, "stop": [stop, "never-appears"]}).json()
    assert blocking["choices"][0]["message"]["content"] == expected
    assert blocking["choices"][0]["finish_reason"] == "stop"
    streamed = stream(http, "/v1/chat/completions", {**base, "stop": stop})
    assert streamed.text == expected
    assert stop not in streamed.text
    assert streamed.finish_reasons == ["stop"]


def test_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=TINY, messages=CJK, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)


def test_dify_extras_and_message_forms_are_accepted(http: httpx.Client) -> None:
    body = {
        "model": TINY, "stream": False, "temperature": 0.2, "top_p": 0.9, "max_completion_tokens": 4,
        "presence_penalty": 0.5, "frequency_penalty": 0.5, "user": "dify-user", "tool_choice": "auto",
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
        "response_format": {"type": "text"}, "chat_template_kwargs": {"enable_thinking": False},
        "thinking": {"type": "disabled"}, "enable_thinking": False, "reasoning_effort": "low", "web_search": False,
        "functions": [{"name": "f", "parameters": {}}], "repetition_penalty": 1.1, "top_k": 20,
        "messages": [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "content": "{\"temperature_c\": 21}", "tool_call_id": "call_1"},
            {"role": "assistant", "content": None, "name": "bot"},
            {"role": "user", "content": "Thanks"},
        ],
    }
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["usage"]["completion_tokens"] <= 4
    assert "content" in data["choices"][0]["message"]


def test_raw_utf8_body_with_any_charset_is_decoded_as_utf8(http: httpx.Client) -> None:
    import json

    raw = json.dumps({"model": TINY, "messages": CJK, "max_tokens": 2}, ensure_ascii=False).encode("utf-8")
    r = http.post("/v1/chat/completions", content=raw,
                  headers={"content-type": "application/json; charset=latin-1", "accept-charset": "utf-8"})
    assert r.status_code == 200, r.text
