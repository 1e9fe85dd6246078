"""Dify conformance: Dify's own plugin SDK (``dify-plugin``, Python 3.12) against the real server.

``scripts/dify_venv.sh`` builds ``.venv-dify`` in test setup; ``tests/e2e/dify_driver.py`` runs there and
calls ``OAICompatLargeLanguageModel`` exactly as Dify's plugin runtime does, printing one JSON result with
the answer, the chunks, the usage Dify would bill and the requests it sent on the wire.  Every usage figure
is checked against the server's own answer to the same request replayed here with httpx, so a usage that
Dify estimated (GPT-2 tokenizer, which needs a download an air-gapped Dify cannot make) fails the test.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import SMOL, TINY
from tests.e2e.dify import VENV_SCRIPT, Dify
from tests.e2e.helpers import stream
from tests.process import ServerProcess

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def greedy(dify: Dify, smol_server: ServerProcess) -> dict[str, Any]:
    """The blocking greedy answer to QUESTION, which the streaming and stop tests compare against."""
    return dify.ok("blocking", smol_server.url + "/v1", SMOL, "--prompt", QUESTION)


def only_request(result: dict[str, Any]) -> dict[str, Any]:
    assert len(result["wire"]) == 1, result["wire"]
    sent: dict[str, Any] = result["wire"][0]
    assert sent["status"] == 200
    return sent


def replay_blocking(sent: dict[str, Any]) -> dict[str, Any]:
    """The server's own answer to the exact body Dify sent."""
    response = httpx.post(sent["url"], json=sent["body"], timeout=240)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def replay_stream(sent: dict[str, Any]) -> tuple[str, dict[str, int]]:
    with httpx.Client(timeout=240) as client:
        result = stream(client, sent["url"], sent["body"])
    assert result.status == 200 and result.done
    assert result.usage is not None
    return result.text, result.usage


def assert_usage(usage: dict[str, int] | None, expected: dict[str, int]) -> None:
    assert usage is not None
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["prompt_tokens"] == expected["prompt_tokens"]
    assert usage["completion_tokens"] == expected["completion_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_venv_script_reuses_the_venv(dify_python: Path) -> None:
    started = time.monotonic()
    proc = subprocess.run(["bash", str(VENV_SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "reusing" in proc.stderr
    assert Path(proc.stdout.strip()) == dify_python
    assert time.monotonic() - started < 20


@pytest.mark.parametrize("suffix", ["/v1", "/v1/", ""])
def test_validate_credentials(dify: Dify, smol_server: ServerProcess, suffix: str) -> None:
    result = dify.ok("validate", smol_server.url + suffix, SMOL)
    sent = only_request(result)
    expected_url = smol_server.url + ("/v1" if suffix else "") + "/chat/completions"
    assert sent["url"] == expected_url
    assert sent["body"] == {"model": SMOL, "max_tokens": 5, "messages": [{"role": "user", "content": "ping"}]}
    assert "Authorization" not in sent["headers"]
    assert sent["response_content_type"].startswith("application/json")


def test_validate_unknown_model_fails_readably(dify: Dify, smol_server: ServerProcess) -> None:
    result = dify.run("validate", smol_server.url + "/v1", "gpt-9")
    assert not result["ok"]
    assert result["error_type"] == "CredentialsValidateFailedError"
    assert "status code 404" in result["error"]
    body = json.loads(result["error"].split("response body ", 1)[1])
    assert "gpt-9" in body["error"]["message"] and SMOL in body["error"]["message"]


def test_blocking_answer_and_exact_usage(greedy: dict[str, Any]) -> None:
    assert "Paris" in greedy["text"]
    assert greedy["chunks"] == 1 and greedy["stream"] is False
    sent = only_request(greedy)
    assert sent["body"]["stream"] is False
    assert sent["body"]["temperature"] == 0
    assert sent["body"]["messages"] == [{"role": "user", "content": QUESTION}]
    assert sent["response_content_type"].startswith("application/json")
    server = replay_blocking(sent)
    assert server["choices"][0]["message"]["content"] == greedy["text"]
    assert_usage(greedy["usage"], server["usage"])
    assert greedy["estimations"] == 0
    assert server["usage"]["prompt_tokens_details"]["cached_tokens"] >= 0  # OpenAI's detail: Dify reads around it


def test_stream_chunks_and_final_usage(dify: Dify, smol_server: ServerProcess, greedy: dict[str, Any]) -> None:
    result = dify.ok("stream", smol_server.url + "/v1", SMOL, "--prompt", QUESTION)
    assert result["stream"] is True
    assert result["text"] == greedy["text"]
    assert result["content_chunks"] > 1
    assert result["chunks"] == result["content_chunks"] + 1  # the SDK's closing chunk carries the usage
    assert result["usage_chunk_indexes"] == [result["chunks"] - 1]
    assert result["finish_reason"] == "stop"
    sent = only_request(result)
    assert sent["body"]["stream"] is True
    assert "stream_options" not in sent["body"]  # the bare SDK never asks for usage: it must come anyway
    assert sent["response_content_type"].startswith("text/event-stream")
    text, usage = replay_stream(sent)
    assert text == result["text"]
    assert_usage(result["usage"], usage)
    assert result["usage"] == greedy["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= 0  # type: ignore[index]
    assert result["estimations"] == 0


def test_multiturn_with_system_prompt(dify: Dify, smol_server: ServerProcess, greedy: dict[str, Any]) -> None:
    result = dify.ok("multiturn", smol_server.url + "/v1", SMOL)
    assert "Berlin" in result["text"]
    sent = only_request(result)
    assert [m["role"] for m in sent["body"]["messages"]] == ["system", "user", "assistant", "user"]
    server = replay_blocking(sent)
    assert server["choices"][0]["message"]["content"] == result["text"]
    assert_usage(result["usage"], server["usage"])
    assert result["usage"]["prompt_tokens"] > greedy["usage"]["prompt_tokens"] + 10  # history and system sent
    assert result["estimations"] == 0


@pytest.mark.parametrize("streamed", [False, True], ids=["blocking", "stream"])
def test_stop_word_cuts_the_answer(dify: Dify, smol_server: ServerProcess, greedy: dict[str, Any],
                                   streamed: bool) -> None:
    words = re.findall(r"[A-Za-z]+", greedy["text"])
    stop_word = words[-1]  # "Paris" in "The capital of France is Paris."
    cut = greedy["text"].index(stop_word)
    assert cut > 0
    result = dify.ok("stop", smol_server.url + "/v1", SMOL, "--prompt", QUESTION, "--stop", stop_word,
                     *(["--stream"] if streamed else []))
    assert result["text"] == greedy["text"][:cut]
    assert stop_word not in result["text"]
    sent = only_request(result)
    assert sent["body"]["stop"] == [stop_word]
    if streamed:
        assert result["finish_reason"] == "stop"
        _, usage = replay_stream(sent)
    else:
        usage = replay_blocking(sent)["usage"]
    assert_usage(result["usage"], usage)
    assert result["usage"]["completion_tokens"] < greedy["usage"]["completion_tokens"]
    assert result["estimations"] == 0


def test_tiny_without_v1_validate_and_blocking(dify: Dify, tiny_server: ServerProcess) -> None:
    validated = dify.ok("validate", tiny_server.url, TINY)
    assert only_request(validated)["url"] == tiny_server.url + "/chat/completions"
    result = dify.ok("blocking", tiny_server.url, TINY, "--prompt", QUESTION, "--max-tokens", "12")
    sent = only_request(result)
    assert sent["url"] == tiny_server.url + "/chat/completions"
    server = replay_blocking(sent)
    assert server["choices"][0]["message"]["content"] == result["text"]
    assert_usage(result["usage"], server["usage"])
    assert result["estimations"] == 0
    assert server["usage"]["prompt_tokens_details"]["cached_tokens"] >= 0  # OpenAI's detail: Dify reads around it
