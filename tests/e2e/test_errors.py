"""Bad input gets the right status and an OpenAI-shaped error, and the server keeps answering."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import TINY
from tests.e2e.helpers import assert_error
from tests.process import ServerProcess

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def http(tiny_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=tiny_server.url, timeout=60) as client:
        yield client


@pytest.fixture(autouse=True)
def still_serving(http: httpx.Client):  # type: ignore[no-untyped-def]
    yield
    r = http.post("/v1/chat/completions", json={"model": TINY, "messages": MSG, "max_tokens": 2})
    assert r.status_code == 200, "the server must answer the next request after a bad one"


def post(http: httpx.Client, body: object, path: str = "/v1/chat/completions", **kw: object) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return http.post(path, content=body, headers={"content-type": "application/json"}, **kw)  # type: ignore[arg-type]
    return http.post(path, json=body, **kw)  # type: ignore[arg-type]


def test_malformed_json(http: httpx.Client) -> None:
    error = assert_error(post(http, b'{"model": "x", "messages": [}'), 400, "invalid_json")
    assert "JSON" in error["message"]


def test_empty_body_and_non_object(http: httpx.Client) -> None:
    assert_error(post(http, b""), 400, "invalid_json")
    assert_error(post(http, b"[1, 2]"), 400, "invalid_json")


def test_invalid_utf8(http: httpx.Client) -> None:
    error = assert_error(post(http, b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "\xff\xfe"}]}'),
                         400, "invalid_json")
    assert "UTF-8" in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": TINY, "messages": "hello"}, "messages"),
        ({"model": TINY, "messages": []}, "messages"),
        ({"model": TINY}, "messages"),
        ({"messages": MSG}, "model"),
        ({"model": TINY, "messages": MSG, "temperature": "hot"}, "temperature"),
        ({"model": TINY, "messages": MSG, "temperature": 3}, "temperature"),
        ({"model": TINY, "messages": MSG, "max_tokens": 0}, "max_tokens"),
        ({"model": TINY, "messages": MSG, "max_tokens": -5}, "max_tokens"),
        ({"model": TINY, "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"model": TINY, "messages": MSG, "n": 0}, "n"),
        ({"model": TINY, "messages": MSG, "stop": 5}, "stop"),
    ],
)
def test_invalid_fields_name_the_param(http: httpx.Client, body: dict, param: str) -> None:
    error = assert_error(post(http, body), 400, "invalid_request", param)
    assert error["type"] == "invalid_request_error"


def test_unknown_model(http: httpx.Client) -> None:
    error = assert_error(post(http, {"model": "gpt-9", "messages": MSG}), 404, "model_not_found", "model")
    assert "gpt-9" in error["message"] and TINY in error["message"]


def test_image_content_is_refused_clearly(http: httpx.Client) -> None:
    body = {"model": TINY, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}
    assert_error(post(http, body), 400, "unsupported_feature", "messages.0.content")


def test_prompt_beyond_context_window(http: httpx.Client) -> None:
    body = {"model": TINY, "messages": [{"role": "user", "content": "hello world " * 400}]}
    error = assert_error(post(http, body), 400, "context_length_exceeded")
    assert "512" in error["message"]


def test_prompt_plus_max_tokens_beyond_window_has_the_numbers(http: httpx.Client) -> None:
    body = {"model": TINY, "messages": MSG, "max_tokens": 600}
    error = assert_error(post(http, body), 400, "context_length_exceeded", "max_tokens")
    assert "512" in error["message"] and "600" in error["message"]


def test_ten_megabyte_body(http: httpx.Client) -> None:
    big = b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "' + b"a" * (10 * 1024 * 1024) + b'"}]}'
    assert_error(post(http, big), 413, "request_too_large")


def test_unknown_path_and_wrong_method_are_json(http: httpx.Client) -> None:
    assert_error(http.get("/v1/nothing-here"), 404, "not_found")
    assert_error(http.get("/v1/chat/completions"), 405, "method_not_allowed")
    assert_error(http.post("/v1/models", json={}), 405, "method_not_allowed")


def test_error_in_streaming_request_is_json_before_first_byte(http: httpx.Client) -> None:
    r = post(http, {"model": "nope", "messages": MSG, "stream": True})
    assert_error(r, 404, "model_not_found")


def test_completions_bad_prompt(http: httpx.Client) -> None:
    assert_error(post(http, {"model": TINY, "prompt": []}, "/v1/completions"), 400, "invalid_request", "prompt")
    assert_error(post(http, {"model": TINY}, "/v1/completions"), 400, "invalid_request", "prompt")
