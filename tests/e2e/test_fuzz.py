"""Seeded fuzzing of the public routes on the real tiny model (issue 8: keep the hardening fixed).

A few hundred mutated bodies per route (hostile numbers, wrong types, deleted and unknown fields, odd
messages and prompts, broken JSON and UTF-8), sent a batch at a time while innocent streams decode in
the same engine.  Every answer is a 2xx or an OpenAI-shaped 4xx, never a 5xx (nor a server error event
inside a stream); the server answers a normal request after each batch; the innocent streams finish
with every token they asked for.  ``FUZZ_SEED`` / ``FUZZ_ROUNDS`` run it longer by hand.
"""

from __future__ import annotations

import json
import os
import random
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.conftest import TINY
from tests.e2e.helpers import SSEResult, parse_sse, stream
from tests.process import ServerProcess

SEED = int(os.environ.get("FUZZ_SEED", "20261130"))
ROUNDS = int(os.environ.get("FUZZ_ROUNDS", "6"))  # batches per route; 50 bodies each
BATCH = 50
HI = [{"role": "user", "content": "hi"}]

HOSTILE: list[Any] = [
    None, True, False, 0, 1, -1, 2, 7, 25, 65, 2**31 - 1, 2**31, 2**53, 2**63 - 1, 2**63, 2**64 - 1, -(2**63),
    0.5, -0.5, 1e-300, -1e-300, 1e308, -1e308, 3.0, "", "x", "你好", "\u0000", "x" * 2000, "🚀" * 50, [], {},
    [1, 2, 3], [-1], [999_999], [[]], [[1, 2], [3]], ["a", "b"], ["x"] * 20, [None], [{}], {"a": 1},
    {"messages": []}, {"type": "text", "text": "hi"}, [{"type": "image_url", "image_url": {"url": "x"}}],
]
CHAT_FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
               "stop", "stop_token_ids", "presence_penalty", "frequency_penalty", "repetition_penalty", "n",
               "stream", "stream_options", "logprobs", "top_logprobs", "min_tokens", "ignore_eos", "tools",
               "tool_choice", "chat_template_kwargs", "user", "response_format", "logit_bias", "unknown_field"]
COMPLETION_FIELDS = [f for f in CHAT_FIELDS if f not in ("messages", "max_completion_tokens", "top_logprobs",
                                                         "tools", "tool_choice", "chat_template_kwargs")]
COMPLETION_FIELDS += ["prompt", "echo", "suffix", "logprobs"]


def hostile(rng: random.Random) -> Any:
    value = rng.choice(HOSTILE)
    if rng.random() < 0.15:  # deeper structure
        value = {"k": [value, {"v": value}]} if rng.random() < 0.5 else [value] * rng.randint(1, 4)
    return value


def message(rng: random.Random) -> Any:
    m: dict[str, Any] = {"role": rng.choice(["user", "system", "assistant", "tool", "developer", "wizard", 5]),
                         "content": rng.choice(["hi", "", None, "你好" * 10, [{"type": "text", "text": "a"}],
                                                hostile(rng)])}
    if rng.random() < 0.2:
        m["tool_calls"] = rng.choice([[], [{"id": "1", "type": "function", "function": {"name": "f",
                                                                                         "arguments": "{}"}}],
                                      hostile(rng)])
    if rng.random() < 0.1:
        del m["role"]
    return m if rng.random() > 0.05 else hostile(rng)


def mutate(rng: random.Random, base: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    body = json.loads(json.dumps(base))
    for _ in range(rng.randint(1, 3)):
        roll = rng.random()
        field = rng.choice(fields)
        if roll < 0.55:
            body[field] = hostile(rng)
        elif roll < 0.65:
            body.pop(field, None)
        elif roll < 0.85 and "messages" in body:
            body["messages"] = [message(rng) for _ in range(rng.randint(0, 4))]
        elif "prompt" in body:
            body["prompt"] = rng.choice([[rng.randint(-3, 700) for _ in range(rng.randint(0, 6))], "", "a" * 600,
                                         [[rng.randint(0, 700)], [rng.randint(0, 700)]], [""], hostile(rng)])
    if body.get("max_tokens") is None and rng.random() < 0.9:
        body["max_tokens"] = 4  # keep the valid ones short
    return body


def encode(rng: random.Random, body: dict[str, Any]) -> bytes:
    raw = json.dumps(body, ensure_ascii=rng.random() < 0.5).encode()
    roll = rng.random()
    if roll < 0.03:
        return raw[: rng.randint(0, len(raw))]  # truncated
    if roll < 0.06:
        at = rng.randint(0, len(raw))
        return raw[:at] + bytes([rng.choice([0xFF, 0xC3, 0x00, 0x7B, 0x5D])]) + raw[at:]  # a stray byte
    return raw


def check(response_status: int, content_type: str, raw: bytes, streamed: bool) -> None:
    assert response_status < 500, raw[:500]
    if response_status >= 400:
        assert content_type.startswith("application/json"), raw[:200]
        error = json.loads(raw)["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"] and "Traceback" not in error["message"]
        return
    if streamed:
        events, _, done = parse_sse(raw)
        assert done
        for event in events:
            if "error" in event:
                assert event["error"]["type"] != "server_error", event
        return
    assert "choices" in json.loads(raw)


def send(client: httpx.Client, path: str, payload: bytes, streamed: bool) -> None:
    headers = {"content-type": "application/json"}
    if streamed:
        with client.stream("POST", path, content=payload, headers=headers) as r:
            raw = r.read()
        check(r.status_code, r.headers.get("content-type", ""), raw, r.status_code == 200)
    else:
        r = client.post(path, content=payload, headers=headers)
        check(r.status_code, r.headers.get("content-type", ""), r.content, False)


@pytest.fixture(scope="module")
def http(tiny_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=tiny_server.url, timeout=120) as client:
        yield client


def innocents(http: httpx.Client) -> tuple[list[SSEResult], Callable[[], None]]:
    results: list[SSEResult] = []

    def one(i: int) -> None:
        results.append(stream(http, "/v1/chat/completions", {"model": TINY, "messages": HI, "max_tokens": 48,
                                                              "ignore_eos": True, "seed": i, "temperature": 0.7}))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()

    def join() -> None:
        for t in threads:
            t.join()

    return results, join


@pytest.mark.parametrize(("path", "base", "fields"), [
    ("/v1/chat/completions", {"model": TINY, "messages": HI}, CHAT_FIELDS),
    ("/v1/completions", {"model": TINY, "prompt": "Hello"}, COMPLETION_FIELDS),
], ids=["chat", "completions"])
def test_mutated_bodies_never_get_a_5xx_nor_fail_an_innocent_request(
        http: httpx.Client, path: str, base: dict[str, Any], fields: list[str]) -> None:
    rng = random.Random(f"{SEED}-{path}")
    for _ in range(ROUNDS):
        results, join = innocents(http)
        bodies = [mutate(rng, base, fields) for _ in range(BATCH)]
        payloads = [(encode(rng, b), b.get("stream") is True) for b in bodies]
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda p: send(http, path, *p), payloads))
        join()
        assert [r.usage["completion_tokens"] if r.usage else None for r in results] == [48, 48], \
            [r.events[-3:] for r in results]
        normal = http.post(path, json={**base, "max_tokens": 2})
        assert normal.status_code == 200, normal.text


def test_odd_paths_and_methods_are_json_errors(http: httpx.Client) -> None:
    rng = random.Random(SEED)
    for _ in range(60):
        path = rng.choice(["/v1/models/", "/models/", "/v1/", "/v1/chat/", "/admin/keys/", "/admin/audit"])
        path += rng.choice(["", "x", "%00", "..%2F..", "你好", "a" * 300, TINY, "%ff"])
        method = rng.choice(["GET", "POST", "DELETE", "PUT"])
        r = http.request(method, path, params={"limit": rng.choice(["nan", "-1", "1e400", "x"])})
        assert r.status_code < 500, (method, path, r.text)
        if r.status_code >= 400:
            check(r.status_code, r.headers.get("content-type", ""), r.content, False)
