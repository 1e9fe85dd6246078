"""One request must never fail another (issue 8), on the real tiny model through the real CLI, on each engine.

Every sampling value that used to poison a batched step is a 400 naming its parameter and range, sent while
innocent streams decode in the same engine: they finish untouched.  A megabyte prompt is refused without
being tokenized, a call with more choices than the engine could ever hold is a 400 (never a 429 to retry
forever), and input that used to crash the server (deeply nested tools, reserved template arguments) is a
400 on a keep-alive connection that stays usable.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.client import HTTPConnection
from typing import Any

import httpx
import pytest

from tests.conftest import TINY
from tests.e2e.helpers import SSEResult, assert_error, stream
from tests.process import ServerProcess

HI = [{"role": "user", "content": "hi"}]
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@pytest.fixture(scope="module")
def http(tiny_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=tiny_server.url, timeout=120) as client:
        yield client


DEEP = "__nested_1000_levels__"  # replaced in the encoded body: Python's json cannot encode 1000 levels


def encode(body: dict[str, Any]) -> bytes:
    nested = '{"type": "object", "properties": {"x": ' * 500 + "{}" + "}}" * 500
    return json.dumps(body).replace(json.dumps(DEEP), nested).encode()


def post(http: httpx.Client, path: str, body: dict[str, Any]) -> httpx.Response:
    return http.post(path, content=encode(body), headers={"content-type": "application/json"})


POISON: list[tuple[str, dict[str, Any], str | None]] = [
    (CHAT, {"top_k": 2**63}, "top_k"),
    (CHAT, {"top_k": -2}, "top_k"),
    (CHAT, {"repetition_penalty": 1e-300}, "repetition_penalty"),
    (CHAT, {"repetition_penalty": 0}, "repetition_penalty"),
    (CHAT, {"min_tokens": 9, "max_tokens": 3}, "min_tokens"),
    (CHAT, {"max_tokens": 2**40}, "max_tokens"),
    (CHAT, {"stop_token_ids": [-1]}, "stop_token_ids.0"),
    (CHAT, {"stop_token_ids": [5, 2**31 - 1]}, "stop_token_ids"),  # beyond the vocabulary: vLLM failed it late
    (CHAT, {"stop": ["x"] * 17}, "stop"),
    (CHAT, {"stop": "y" * 513}, "stop"),
    (CHAT, {"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    (COMPLETIONS, {"prompt": [999999]}, "prompt"),
    (COMPLETIONS, {"prompt": [-5]}, "prompt"),
    (COMPLETIONS, {"prompt": [[]]}, "prompt"),
    (COMPLETIONS, {"prompt": [[1, 2], [3, 2**31]]}, "prompt"),
    (CHAT, {"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs.messages"),
    (CHAT, {"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs.add_generation_prompt"),
    (CHAT, {"tools": [{"type": "function", "function": {"name": "f", "parameters": DEEP}}]}, "tools"),
]


def innocent_streams(http: httpx.Client, count: int, tokens: int) -> tuple[list[SSEResult], list[threading.Thread]]:
    results: list[SSEResult] = []

    def one(i: int) -> None:
        body = {"model": TINY, "messages": HI, "max_tokens": tokens, "ignore_eos": True, "seed": i,
                "temperature": 0.9}
        results.append(stream(http, CHAT, body))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    return results, threads


def test_poisoned_values_are_400s_and_innocent_streams_decoding_beside_them_finish(http: httpx.Client) -> None:
    results, threads = innocent_streams(http, 3, 160)
    for path, extra, param in POISON:
        body = {"model": TINY, "max_tokens": 4, **({"messages": HI} if path == CHAT else {}), **extra}
        error = assert_error(post(http, path, body), 400, "invalid_request", param)
        assert error["type"] == "invalid_request_error"
    for t in threads:
        t.join()
    assert len(results) == 3
    for result in results:
        assert result.status == 200 and result.done
        assert result.finish_reasons == ["length"] and result.usage is not None
        assert result.usage["completion_tokens"] == 160
        assert not [e for e in result.events if "error" in e]


def test_the_allowed_range_is_in_the_message(http: httpx.Client) -> None:
    error = assert_error(http.post(CHAT, json={"model": TINY, "messages": HI, "top_k": 2**63}), 400,
                         "invalid_request", "top_k")
    assert "2147483647" in error["message"]
    error = assert_error(http.post(COMPLETIONS, json={"model": TINY, "prompt": [999999]}), 400, "invalid_request",
                         "prompt")
    assert "999999" in error["message"] and "vocabulary" in error["message"]


def test_extreme_but_valid_values_are_served(http: httpx.Client) -> None:
    for extra in ({"top_k": 2**31 - 1, "temperature": 1.0}, {"seed": 2**64 - 1}, {"seed": -(2**63)},
                  {"repetition_penalty": 0.01}, {"top_p": 1e-300, "temperature": 2.0}, {"temperature": 1e-300},
                  {"logprobs": True, "top_logprobs": 20}, {"stop_token_ids": [0, 522]}):
        r = http.post(CHAT, json={"model": TINY, "messages": HI, "max_tokens": 3, **extra})
        assert r.status_code == 200, (extra, r.text)


def test_a_megabyte_prompt_is_refused_without_tokenizing_and_others_are_served(http: httpx.Client) -> None:
    big = "你好 hello " * 120_000  # 1 MB of UTF-8
    results, threads = innocent_streams(http, 2, 40)
    for path, body in ((CHAT, {"messages": [{"role": "user", "content": big}]}), (COMPLETIONS, {"prompt": big})):
        error = assert_error(http.post(path, json={"model": TINY, **body}), 400, "context_length_exceeded")
        assert "at least" in error["message"] and "512" in error["message"]
    for t in threads:
        t.join()
    assert [r.usage["completion_tokens"] if r.usage else None for r in results] == [40, 40]


def test_more_choices_than_the_engine_holds_is_a_400_with_the_numbers(http: httpx.Client) -> None:
    # the tiny server holds 8 running + 16 waiting = 24 requests
    error = assert_error(http.post(CHAT, json={"model": TINY, "messages": HI, "n": 25, "max_tokens": 2}), 400,
                         "invalid_request")
    assert "25" in error["message"] and "24" in error["message"]
    error = assert_error(http.post(COMPLETIONS, json={"model": TINY, "prompt": ["a"] * 25, "max_tokens": 2}), 400,
                         "invalid_request")
    assert "25" in error["message"] and "24" in error["message"]
    # beyond the server's max_choices (64): refused before any engine is asked
    assert_error(http.post(CHAT, json={"model": TINY, "messages": HI, "n": 65}), 400, "invalid_request", "n")
    assert_error(http.post(COMPLETIONS, json={"model": TINY, "prompt": ["a"] * 33, "n": 2}), 400,
                 "invalid_request", "prompt")
    r = http.post(CHAT, json={"model": TINY, "messages": HI, "n": 24, "max_tokens": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 24


def test_a_keep_alive_connection_survives_every_error(tiny_server: ServerProcess) -> None:
    conn = HTTPConnection("127.0.0.1", tiny_server.port, timeout=60)
    bodies = [*[body for path, body, _ in POISON if path == CHAT][-3:], {"max_tokens": 2}]
    conn.connect()
    sock = conn.sock
    for extra in bodies:
        conn.request("POST", CHAT, encode({"model": TINY, "messages": HI, **extra}),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        assert response.status in (200, 400)
        assert response.getheader("connection", "").lower() != "close"
    assert conn.sock is sock, "the server closed the keep-alive connection"
    conn.close()
