"""The vLLM engine (``--engine vllm``, in-process AsyncLLM) keeps inhouse's API contract.

Runs the real CLI from ``.venv-vllm`` (built by ``scripts/vllm_venv.sh`` in test setup) on the tiny
model and on SmolLM2.  Covers what the transformers-engine suite covers for the wire contract; the full
suite is not parametrized by engine yet (see the issue notes).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import SMOL, TINY
from tests.e2e.helpers import assert_error, stream
from tests.process import REPO, ServerProcess

pytestmark = pytest.mark.slow

CJK = [{"role": "user", "content": "你好，请用中文介绍一下北京。😀"}]


@pytest.fixture(scope="session")
def vllm_python() -> str:
    proc = subprocess.run(["bash", str(REPO / "scripts" / "vllm_venv.sh")], capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, f"scripts/vllm_venv.sh failed:\n{proc.stderr[-4000:]}"
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def server(vllm_python: str, tiny_model_dir: Path, cache_dir: Path, logs_dir: Path) -> Iterator[ServerProcess]:
    args = ["--engine", "vllm", "--model", str(tiny_model_dir), "--name", TINY, "--dtype", "float32",
            "--max-num-seqs", "2", "--max-waiting", "1", "--keepalive", "0.3"]
    with ServerProcess(args, cache_dir, logs_dir / "vllm-tiny.log", ready_timeout=600, python=vllm_python) as s:
        yield s


@pytest.fixture
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def stats(server: ServerProcess) -> dict[str, int]:
    return httpx.get(server.url + "/health", timeout=5).json()["models"][TINY]


def test_model_card_names_the_engine(http: httpx.Client) -> None:
    card = http.get("/v1/models").json()["data"][0]
    assert card["engine"] == "vllm" and card["max_model_len"] == 512


def test_blocking_usage_and_stream_framing(http: httpx.Client, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    body = {"model": TINY, "messages": CJK, "max_tokens": 9, "temperature": 0, "ignore_eos": True}
    blocking = http.post("/v1/chat/completions", json=body).json()
    expected = len(tokenizer.apply_chat_template(CJK, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert blocking["usage"] == {"prompt_tokens": expected, "completion_tokens": 9, "total_tokens": expected + 9}
    assert blocking["choices"][0]["finish_reason"] == "length"
    streamed = stream(http, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    assert streamed.done
    assert streamed.events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert streamed.events[-1]["choices"] == [] and streamed.events[-1]["usage"]["completion_tokens"] == 9
    assert streamed.text.encode() == blocking["choices"][0]["message"]["content"].encode()


def test_stop_strings_and_context_errors(http: httpx.Client) -> None:
    base = {"model": TINY, "messages": CJK, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    full = http.post("/v1/chat/completions", json=base).json()["choices"][0]["message"]["content"]
    stop = full[8:11]
    cut = http.post("/v1/chat/completions", json={**base, "stop": [stop]}).json()["choices"][0]
    assert cut["message"]["content"] == full[: full.index(stop)]
    assert cut["finish_reason"] == "stop"
    error = assert_error(http.post("/v1/chat/completions", json={**base, "max_tokens": 600}), 400,
                         "context_length_exceeded", "max_tokens")
    assert "512" in error["message"]


@pytest.fixture(scope="module")
def smol(vllm_python: str, cache_dir: Path, logs_dir: Path) -> Iterator[ServerProcess]:
    """SmolLM2 on vLLM, at most 2 running and 1 waiting: long requests stay in flight for a while."""
    args = ["--engine", "vllm", "--dtype", "bfloat16", "--context-length", "2048", "--max-num-seqs", "2",
            "--max-waiting", "1"]
    with ServerProcess(args, cache_dir, logs_dir / "vllm-smol.log", ready_timeout=600, python=vllm_python) as s:
        yield s


def smol_stats(server: ServerProcess) -> dict[str, float]:
    return httpx.get(server.url + "/health", timeout=5).json()["models"][SMOL]


def test_smollm2_on_vllm_answers(smol: ServerProcess) -> None:
    question = [{"role": "user", "content": "What is the capital of France?"}]
    r = httpx.post(smol.url + "/v1/chat/completions", timeout=120,
                   json={"model": SMOL, "max_tokens": 20, "temperature": 0, "messages": question})
    assert "Paris" in r.json()["choices"][0]["message"]["content"]


def test_disconnect_aborts_in_vllm_and_full_queue_gets_429(smol: ServerProcess) -> None:
    long = {"model": SMOL, "max_tokens": 1900, "ignore_eos": True, "stream": True,
            "messages": [{"role": "user", "content": "Count to a thousand."}]}
    with httpx.Client(base_url=smol.url, timeout=60) as a, httpx.Client(base_url=smol.url, timeout=60) as b, \
            a.stream("POST", "/v1/chat/completions", json=long) as ra, \
            b.stream("POST", "/v1/chat/completions", json=long) as rb:
        lines_a, lines_b = ra.iter_lines(), rb.iter_lines()  # kept: a dropped iterator closes the connection
        next(lines_a)
        next(lines_b)
        deadline = time.monotonic() + 30
        while smol_stats(smol)["running"] < 2:
            assert time.monotonic() < deadline, f"vLLM never ran both: {smol_stats(smol)}"
            time.sleep(0.05)
        assert smol_stats(smol)["kv_cache_usage"] > 0
        with httpx.Client(base_url=smol.url, timeout=60) as c, \
                c.stream("POST", "/v1/chat/completions", json=long) as rc:
            lines_c = rc.iter_lines()
            next(lines_c)  # the third is admitted and waits in vLLM's queue
            refused = httpx.post(smol.url + "/v1/chat/completions", json={**long, "stream": False}, timeout=60)
            assert_error(refused, 429, "queue_full")
            assert int(refused.headers["retry-after"]) >= 1
    # 1900 tokens each would take minutes: all three must leave vLLM right after the disconnects
    deadline = time.monotonic() + 10
    while smol_stats(smol)["running"] or smol_stats(smol)["waiting"]:
        assert time.monotonic() < deadline, f"vLLM still runs aborted requests: {smol_stats(smol)}"
        time.sleep(0.05)
