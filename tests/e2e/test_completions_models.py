"""/v1/completions and /v1/models on the tiny model through the real CLI."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import TINY
from tests.e2e.helpers import assert_error, stream
from tests.process import ServerProcess


@pytest.fixture(scope="module")
def http(tiny_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=tiny_server.url, timeout=60) as client:
        yield client


def test_completion_blocking_and_stream_agree(tiny_server: ServerProcess, http: httpx.Client,
                                             request: pytest.FixtureRequest) -> None:
    client = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="x", max_retries=0)
    request.addfinalizer(client.close)
    body = {"model": TINY, "prompt": "北京是中国的首都", "max_tokens": 20, "temperature": 0}
    blocking = client.completions.create(**body, extra_body={"ignore_eos": True})
    assert blocking.object == "text_completion"
    assert blocking.choices[0].finish_reason == "length"
    assert blocking.usage is not None and blocking.usage.completion_tokens == 20
    streamed = stream(http, "/v1/completions", {**body, "ignore_eos": True})
    assert streamed.done
    assert all(e["object"] == "text_completion" for e in streamed.events)
    assert streamed.text == blocking.choices[0].text
    assert streamed.usage is not None and streamed.usage["completion_tokens"] == 20


def test_completion_echo_batch_and_logprobs(http: httpx.Client) -> None:
    r = http.post("/completions", json={"model": TINY, "prompt": ["Hello", "你好"], "max_tokens": 3, "echo": True,
                                        "logprobs": 2, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert choices[0]["text"].startswith("Hello") and choices[1]["text"].startswith("你好")
    assert len(choices[0]["logprobs"]["tokens"]) == 3
    # legacy format: a dict per token, so two tokens that decode alike (partial bytes) share a key
    assert all(1 <= len(t) <= 2 for t in choices[0]["logprobs"]["top_logprobs"])


def test_completion_token_id_prompt(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"model": TINY, "prompt": [5, 6, 7, 8], "max_tokens": 2, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 4


@pytest.mark.parametrize("prefix", ["/v1", ""])
def test_models_list_and_get(http: httpx.Client, prefix: str) -> None:
    listing = http.get(prefix + "/models").json()
    assert listing["object"] == "list"
    card = next(m for m in listing["data"] if m["id"] == TINY)
    assert card["object"] == "model"
    assert card["max_model_len"] == 512
    # both engines enforce response_format, and so offer tools even though the tiny model's template has none
    assert card["capabilities"] == ["chat", "completion", "json_schema", "tools"]
    one = http.get(f"{prefix}/models/{TINY}")
    assert one.status_code == 200 and one.json()["id"] == TINY
    assert_error(http.get(prefix + "/models/nope"), 404, "model_not_found", "model")


def test_health_and_ready(http: httpx.Client) -> None:
    assert http.get("/ready").json()["status"] == "ready"
    health = http.get("/health").json()
    assert health["models"][TINY]["state"] == "ready"
