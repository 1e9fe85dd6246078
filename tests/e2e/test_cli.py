"""``inhouse serve --config``: several models from one YAML file, template overrides, defaults, fakes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from tests.e2e.helpers import stream
from tests.process import REPO, ServerProcess

TEMPLATE = ("{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[ASSISTANT] {% endif %}")


@pytest.fixture(scope="module")
def config_server(tiny_model_dir: Path, cache_dir: Path, logs_dir: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("config")
    (folder / "plain.jinja").write_text(TEMPLATE, encoding="utf-8")
    (folder / "inhouse.yaml").write_text(f"""
models:
  - name: chatml
    path: {tiny_model_dir}
    dtype: float32
  - name: plain
    path: {tiny_model_dir}
    dtype: float32
    chat_template: plain.jinja
    defaults: {{max_tokens: 3, temperature: 0}}
  - name: scripted
    path: unused
    engine: fake
    fake_reply: "Hello from the fake engine, one word at a time."
  - name: paced
    path: unused
    engine: fake
    fake_reply: "one two three four five six"
    fake_token_delay: 0.05
  - name: broken
    path: unused
    engine: fake
    fake_fail_after: 2
""", encoding="utf-8")
    with ServerProcess(["--config", str(folder / "inhouse.yaml")], cache_dir, logs_dir / "config.log") as server:
        yield server


@pytest.fixture(scope="module")
def http(config_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=config_server.url, timeout=60) as c:
        yield c


def test_all_models_are_listed_with_their_engine(http: httpx.Client) -> None:
    cards = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert set(cards) == {"chatml", "plain", "scripted", "paced", "broken"}
    assert cards["chatml"]["engine"] == "transformers" and cards["scripted"]["engine"] == "fake"


def test_template_override_and_model_defaults(http: httpx.Client, tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": "Hello there"}]
    r = http.post("/v1/chat/completions", json={"model": "plain", "messages": messages, "ignore_eos": True}).json()
    expected = tokenizer("[USER] Hello there\n[ASSISTANT] ", add_special_tokens=False)["input_ids"]
    assert r["usage"]["prompt_tokens"] == len(expected)
    assert r["usage"]["completion_tokens"] == 3  # the model's default max_tokens
    chatml = http.post("/v1/chat/completions", json={"model": "chatml", "messages": messages, "max_tokens": 1}).json()
    assert chatml["usage"]["prompt_tokens"] != len(expected)


def test_fake_engine_scripted_reply_and_stop(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={"model": "scripted", "messages": [{"role": "user", "content": "hi"}]})
    assert r.json()["choices"][0]["message"]["content"] == "Hello from the fake engine, one word at a time."
    cut = stream(http, "/v1/chat/completions",
                 {"model": "scripted", "messages": [{"role": "user", "content": "hi"}], "stop": ["engine"]})
    assert cut.text == "Hello from the fake "
    assert cut.finish_reasons == ["stop"]


def test_a_paced_stream_sends_one_event_per_token(http: httpx.Client) -> None:
    result = stream(http, "/v1/chat/completions", {"model": "paced", "messages": [{"role": "user", "content": "x"}]})
    pieces = [e["choices"][0]["delta"]["content"] for e in result.events
              if e.get("choices") and e["choices"][0]["delta"].get("content")]
    assert pieces == ["one ", "two ", "three ", "four ", "five ", "six"]


def test_failure_mid_stream_is_one_error_event_then_done(http: httpx.Client) -> None:
    result = stream(http, "/v1/chat/completions", {"model": "broken", "messages": [{"role": "user", "content": "x"}]})
    assert result.status == 200 and result.done
    assert result.text == "This is ", "the two tokens before the failure are delivered"
    errors = [e for e in result.events if "error" in e]
    assert len(errors) == 1 and errors[0]["error"]["code"] == "engine_error"
    assert "choices" not in errors[0]
    assert result.finish_reasons == [], "a truncated answer must not claim to have finished"


def test_failure_before_the_answer_in_blocking_mode_is_a_500(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={"model": "broken", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "engine_error"


def test_bad_config_exits_2_with_a_readable_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [{name: a, path: x, max_num_seqs: -1}]\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "inhouse", "serve", "--config", str(bad)], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2
    assert "models.0.max_num_seqs" in proc.stderr and "Traceback" not in proc.stderr


def test_model_flags_with_config_are_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "ok.yaml"
    cfg.write_text("models: [{name: a, path: x, engine: fake}]\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "inhouse", "serve", "--config", str(cfg), "--max-num-seqs", "4"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2 and "--max-num-seqs" in proc.stderr
