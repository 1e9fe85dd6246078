"""Upstreams that answer wrongly, through real processes: a fault upstream (tests/fault_upstream.py) scripted
to send malformed or wrong-shaped chunks, HTML or plain JSON instead of SSE, or to stall, with the inhouse
under test in front of it.

Every answer must be a clean OpenAI-shaped error within the configured timeouts (2 s first-token, 5 s
total): 502 ``upstream_error`` for a blocking client once the upstream's first token arrived, one SSE error
event then ``[DONE]`` for a stream; and when the bad answer came before anything reached the client, it
counts as a failed attempt, so the fallback (a second, well-behaved upstream) answers instead.  A timeout
names the setting that fired.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.helpers import SSEResult, assert_error, parse_sse
from tests.e2e.test_gateway import Upstream
from tests.process import ServerProcess

HI = [{"role": "user", "content": "hi"}]
REPLY = "Hello from the upstream server"
FIRST_TOKEN, TOTAL = 2, 5  # the fault upstream's timeouts, seconds
WITHIN = TOTAL + 2  # every answer, error or not, must arrive within this

GOOD = json.dumps({"choices": [{"index": 0, "delta": {"content": "Hello "}, "finish_reason": None}]})
FINISH = json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
# valid JSON of the wrong shape (and some not JSON at all), each as the data of one SSE event
BAD_CHUNKS = {
    "choice-a-string": '{"choices":["oops"]}',
    "choices-an-object": '{"choices":{"index":0,"delta":{"content":"x"}}}',
    "delta-a-string": '{"choices":[{"index":0,"delta":"oops","finish_reason":null}]}',
    "content-a-number": '{"choices":[{"index":0,"delta":{"content":42},"finish_reason":null}]}',
    "content-an-object": '{"choices":[{"index":0,"delta":{"content":{"text":"x"}},"finish_reason":null}]}',
    "finish-reason-a-number": '{"choices":[{"index":0,"delta":{},"finish_reason":7}]}',
    "prompt-tokens-a-list": '{"choices":[],"usage":{"prompt_tokens":[1],"completion_tokens":1,"total_tokens":2}}',
    "usage-a-list": '{"choices":[],"usage":[1,2]}',
    "a-json-array": "[1,2]",
    "a-json-string": '"oops"',
    "a-json-number": "7",
    "json-null": "null",
    "not-json": '{"choices":[',
    "an-error-event": '{"error":{"message":"the model crashed","type":"server_error"}}',
}
NOT_SSE = {"html": {"html": True}, "plain-json": {"plain_json": True}, "no-data-line": {"empty_stream": True}}


@pytest.fixture(scope="module")
def upstreams(logs_dir: Path) -> Iterator[dict[str, Upstream]]:
    """``faulty`` is scripted per test; ``spare`` always answers normally (the fallback)."""
    ups = {name: Upstream(name, logs_dir).start() for name in ("faulty", "spare")}
    yield ups
    for up in ups.values():
        up.stop()


@pytest.fixture(scope="module")
def gateway(upstreams: dict[str, Upstream], tmp_path_factory: pytest.TempPathFactory, cache_dir: Path,
            logs_dir: Path) -> Iterator[ServerProcess]:
    """``direct`` has nowhere else to go; ``guarded`` falls back to ``spare``; ``hasty``'s total timeout is
    shorter than its first-token one.  No retries and a circuit that never opens: one request, one try."""
    faulty, spare = upstreams["faulty"].url + "/v1", upstreams["spare"].url + "/v1"
    timeouts = f"first_token_timeout: {FIRST_TOKEN}, total_timeout: {TOTAL}"
    config = tmp_path_factory.mktemp("faults") / "inhouse.yaml"
    config.write_text(f"""
keepalive_seconds: 1
routing: {{retries: 0, circuit_failures: 1000, circuit_window_seconds: 1, cooldown_seconds: 0.1}}
models:
  - {{name: direct, engine: upstream, base_url: "{faulty}", deployment: faulty-direct, upstream_model: up-model,
     {timeouts}}}
  - {{name: guarded, engine: upstream, base_url: "{faulty}", deployment: faulty-guarded, upstream_model: up-model,
     {timeouts},
     fallbacks: [spare]}}
  - {{name: hasty, engine: upstream, base_url: "{faulty}", deployment: faulty-hasty, upstream_model: up-model,
     first_token_timeout: 3,
     total_timeout: 2}}
  - {{name: spare, engine: upstream, base_url: "{spare}", deployment: spare, upstream_model: up-model}}
""", encoding="utf-8")
    with ServerProcess(["--config", str(config)], cache_dir, logs_dir / "faults-gateway.log") as server:
        yield server


@pytest.fixture
def http(gateway: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=WITHIN + 3) as client:
        yield client


def ask(http: httpx.Client, model: str, path: str = "/v1/chat/completions") -> tuple[httpx.Response, float]:
    body = {"model": model, "messages": HI} if path.endswith("chat/completions") else {"model": model, "prompt": "hi"}
    started = time.monotonic()
    response = http.post(path, json=body)
    return response, time.monotonic() - started


def ask_stream(http: httpx.Client, model: str) -> tuple[SSEResult, float]:
    """The whole SSE body, giving up (failing) once it took longer than ``WITHIN``: keep-alives never end."""
    started = time.monotonic()
    raw = b""
    body = {"model": model, "messages": HI, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        for piece in response.iter_raw():
            raw += piece
            assert time.monotonic() - started < WITHIN, f"still streaming after {WITHIN} s: {raw[-300:]!r}"
    result = SSEResult(status=response.status_code, headers=response.headers, raw=raw)
    if response.status_code == 200:
        result.events, result.comments, result.done = parse_sse(raw)
    return result, time.monotonic() - started


def one_error(result: SSEResult) -> dict[str, Any]:
    assert result.status == 200 and result.done, result.raw[-500:]
    errors = [e for e in result.events if "error" in e]
    assert len(errors) == 1 and errors[0]["error"]["code"] == "upstream_error", result.raw[-500:]
    assert "Traceback" not in errors[0]["error"]["message"]
    assert result.finish_reasons == [], "a broken answer must not claim to have finished"
    return errors[0]["error"]  # type: ignore[no-any-return]


def assert_answered_by_spare(response: httpx.Response, faulty: Upstream, calls_before: int) -> None:
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "spare" and response.headers["x-inhouse-deployment"] == "spare"
    assert response.json()["choices"][0]["message"]["content"] == REPLY
    assert len(faulty.log()) == calls_before + 1, "the faulty upstream was tried first"


@pytest.mark.parametrize("bad", BAD_CHUNKS.values(), ids=list(BAD_CHUNKS))
def test_a_bad_chunk_mid_answer_is_a_502_for_a_blocking_client(
    http: httpx.Client, upstreams: dict[str, Upstream], bad: str
) -> None:
    upstreams["faulty"].script({"raw_chunks": [GOOD, bad, GOOD, FINISH]})
    response, elapsed = ask(http, "direct")
    assert_error(response, 502, "upstream_error")
    assert elapsed < WITHIN


@pytest.mark.parametrize("bad", BAD_CHUNKS.values(), ids=list(BAD_CHUNKS))
def test_a_bad_chunk_mid_stream_is_one_error_event_then_done(
    http: httpx.Client, upstreams: dict[str, Upstream], bad: str
) -> None:
    upstreams["faulty"].script({"raw_chunks": [GOOD, bad, GOOD, FINISH]})
    result, elapsed = ask_stream(http, "direct")
    one_error(result)
    assert result.text == "Hello ", "what came before the bad chunk is passed on"
    assert elapsed < WITHIN


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "stream"])
@pytest.mark.parametrize("bad", BAD_CHUNKS.values(), ids=list(BAD_CHUNKS))
def test_a_bad_first_chunk_is_a_failed_attempt_and_the_fallback_answers(
    http: httpx.Client, upstreams: dict[str, Upstream], bad: str, stream: bool
) -> None:
    faulty = upstreams["faulty"]
    before = len(faulty.log())
    faulty.script({"raw_chunks": [bad, GOOD, FINISH]})
    if not stream:
        response, elapsed = ask(http, "guarded")
        assert_answered_by_spare(response, faulty, before)
    else:
        result, elapsed = ask_stream(http, "guarded")
        assert result.status == 200 and result.done and result.text == REPLY
        assert result.headers["x-inhouse-deployment"] == "spare" and result.events[0]["model"] == "spare"
        assert len(faulty.log()) == before + 1
    assert elapsed < WITHIN


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "stream"])
@pytest.mark.parametrize("step", NOT_SSE.values(), ids=list(NOT_SSE))
def test_a_200_that_is_not_an_event_stream_is_a_failed_attempt(
    http: httpx.Client, upstreams: dict[str, Upstream], step: dict[str, Any], stream: bool
) -> None:
    faulty = upstreams["faulty"]
    before = len(faulty.log())
    faulty.script(step)
    if not stream:
        response, elapsed = ask(http, "guarded")
        assert_answered_by_spare(response, faulty, before)
    else:
        result, elapsed = ask_stream(http, "guarded")
        assert result.status == 200 and result.done and result.text == REPLY
        assert result.headers["x-inhouse-deployment"] == "spare"
        assert len(faulty.log()) == before + 1
    assert elapsed < WITHIN


def test_a_bad_chunk_after_a_role_only_chunk_is_still_a_failed_attempt(
    http: httpx.Client, upstreams: dict[str, Upstream]
) -> None:
    """Nothing reached the client until the first token, so the answer can still come from elsewhere."""
    faulty = upstreams["faulty"]
    before = len(faulty.log())
    role = json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
    faulty.script({"raw_chunks": [role, BAD_CHUNKS["delta-a-string"], GOOD, FINISH]})
    response, elapsed = ask(http, "guarded")
    assert_answered_by_spare(response, faulty, before)
    assert elapsed < WITHIN


def test_silence_after_the_headers_is_a_failed_attempt(http: httpx.Client, upstreams: dict[str, Upstream]) -> None:
    faulty = upstreams["faulty"]
    before = len(faulty.log())
    faulty.script({"stall_after": 0, "stall": TOTAL + 3})  # headers, then nothing
    response, elapsed = ask(http, "guarded")
    assert_answered_by_spare(response, faulty, before)
    assert FIRST_TOKEN - 0.5 < elapsed < WITHIN


def test_a_200_that_is_not_an_event_stream_with_nowhere_else_to_go_is_a_503(
    http: httpx.Client, upstreams: dict[str, Upstream]
) -> None:
    upstreams["faulty"].script({"html": True})
    response, _ = ask(http, "direct")
    assert "event stream" in assert_error(response, 503, "upstream_unavailable")["message"]


def test_a_bad_text_on_the_completions_endpoint_is_a_502(http: httpx.Client, upstreams: dict[str, Upstream]) -> None:
    good = json.dumps({"choices": [{"index": 0, "text": "Hello ", "finish_reason": None}]})
    upstreams["faulty"].script({"raw_chunks": [good, '{"choices":[{"index":0,"text":5}]}']})
    response, elapsed = ask(http, "direct", "/v1/completions")
    assert_error(response, 502, "upstream_error")
    assert elapsed < WITHIN


def test_a_stall_mid_answer_names_the_first_token_timeout(
    http: httpx.Client, upstreams: dict[str, Upstream]
) -> None:
    upstreams["faulty"].script({"stall_after": 2, "stall": TOTAL + 3})
    response, elapsed = ask(http, "direct")
    message = assert_error(response, 502, "upstream_error")["message"]
    assert f"sent nothing for {FIRST_TOKEN} s (first_token_timeout)" in message, message
    assert elapsed < WITHIN


def test_a_stall_mid_stream_names_the_first_token_timeout(
    http: httpx.Client, upstreams: dict[str, Upstream]
) -> None:
    upstreams["faulty"].script({"stall_after": 2, "stall": TOTAL + 3})
    result, elapsed = ask_stream(http, "direct")
    message = one_error(result)["message"]
    assert f"sent nothing for {FIRST_TOKEN} s (first_token_timeout)" in message, message
    assert result.text == "Hello from "
    assert elapsed < WITHIN


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "stream"])
def test_total_timeout_is_a_hard_deadline_on_a_slow_but_steady_answer(
    http: httpx.Client, upstreams: dict[str, Upstream], stream: bool
) -> None:
    upstreams["faulty"].script({"words": 40, "chunk_delay": FIRST_TOKEN / 2})  # never silent long enough
    if stream:
        result, elapsed = ask_stream(http, "direct")
        message = one_error(result)["message"]
        assert result.text.startswith("w0 w1 ")
    else:
        response, elapsed = ask(http, "direct")
        message = assert_error(response, 502, "upstream_error")["message"]
    assert f"took longer than {TOTAL} s in total (total_timeout)" in message, message
    assert elapsed < WITHIN


def test_total_timeout_counts_the_wait_for_the_first_token(http: httpx.Client, upstreams: dict[str, Upstream]) -> None:
    """``hasty``: 2 s in total, 3 s for the first token.  Headers after 2.5 s, then silence: the total fires
    during submit, before anything reached the client, so it is a failed attempt (503 with nowhere to go)."""
    upstreams["faulty"].script({"delay": 2.5, "stall_after": 0, "stall": 3})
    response, elapsed = ask(http, "hasty")
    message = assert_error(response, 503, "upstream_unavailable")["message"]
    assert "2 s in total (total_timeout)" in message, message
    assert elapsed < 2 + 2


def test_extreme_but_valid_values_are_forwarded_as_upstreams_take_them(
    http: httpx.Client, upstreams: dict[str, Upstream]
) -> None:
    """What the edge accepts never fails in the upstream engine: a seed of 2**64 - 1 (and 2**64 for the second
    choice) reached orjson, which raised (a 500), and vLLM refuses seeds outside int64 (a 400)."""
    spare = upstreams["spare"]
    before = len(spare.log())
    for extra in ({"seed": 2**64 - 1, "n": 2}, {"seed": -(2**63)}, {"top_k": 2**31 - 1, "temperature": 2.0},
                  {"max_tokens": 2**31 - 1}, {"stop": ["x" * 512] * 16}, {"repetition_penalty": 0.01},
                  {"stop_token_ids": [0, 2**31 - 1]}, {"logprobs": True, "top_logprobs": 20}):
        response = http.post("/v1/chat/completions", json={"model": "spare", "messages": HI, **extra})
        assert response.status_code == 200, (extra, response.text)
    seeds = [entry["body"].get("seed") for entry in spare.log()[before:]]
    assert seeds[:3] == [2**63 - 1, 0, -(2**63)], seeds  # folded into int64 as the vLLM engine does


def test_no_reader_task_died_unseen(gateway: ServerProcess) -> None:
    """Runs last: whatever the upstream sent, no task exception went unretrieved and nothing spilled a traceback."""
    log = gateway.log_path.read_text(errors="replace")
    assert "Task exception was never retrieved" not in log
    assert "Traceback" not in log
