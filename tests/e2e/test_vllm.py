"""What only the vLLM engine has: ``engine: auto`` choosing it or falling back, and clear refusals.

The API contract itself is checked on vLLM by the rest of the e2e suite, which runs every test that
uses ``tiny_server``, ``smol_server`` or the limits server on both engines (see ``tests/conftest.py``).
One server from ``.venv-vllm`` serves four models from one YAML file: only ``auto-ok`` really starts
vLLM; the others are refused by inhouse's checks before vLLM spends its 20 s start-up on them.  A LoRA adapter
over each ``auto`` model serves on the engine auto picked (vLLM's multi-LoRA, or the transformers engine's).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema_rs
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.process import ServerProcess
from tests.tiny_lora import RECIPES, build_adapter

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "你好"}]
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["celsius", "fahrenheit"]},
                   "temperature_c": {"type": "integer", "minimum": -50, "maximum": 60}},
    "required": ["city", "unit", "temperature_c"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def server(vllm_python: str, tiny_model_dir: Path, cache_dir: Path, logs_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    lora = build_adapter(tiny_model_dir, RECIPES[1], cache_dir / f"tiny-lora-{RECIPES[1].name}")
    folder = tmp_path_factory.mktemp("vllm-config")
    exotic = folder / "exotic"  # the tiny Llama under an architecture name vLLM has never heard of
    shutil.copytree(tiny_model_dir, exotic)
    config = json.loads((exotic / "config.json").read_text(encoding="utf-8"))
    config["architectures"] = ["InhouseExperimentalForCausalLM"]
    (exotic / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "inhouse.yaml").write_text(f"""
models:
  - {{name: auto-ok, path: {tiny_model_dir}, engine: auto, dtype: float32}}
  - {{name: auto-fallback, path: {exotic}, engine: auto, dtype: float32}}
  - {{name: vllm-refused, path: {exotic}, engine: vllm, dtype: float32}}
  - {{name: too-much-kv, path: {tiny_model_dir}, engine: vllm, kv_cache_gib: 100000}}
  - {{name: lora-on-auto, base: auto-ok, adapter: {lora}}}
  - {{name: lora-on-fallback, base: auto-fallback, adapter: {lora}}}
""", encoding="utf-8")
    s = ServerProcess(["--config", str(folder / "inhouse.yaml")], cache_dir, logs_dir / "vllm-config.log",
                      ready_timeout=600, python=vllm_python)
    try:
        s.start(wait_ready=False)
        s.wait_settled()  # /ready never turns 200 here: two models are meant to fail
        yield s
    finally:
        s.stop()


def test_auto_picks_vllm_for_a_model_it_supports(server: ServerProcess) -> None:
    card = httpx.get(server.url + "/v1/models/auto-ok", timeout=10).json()
    assert card["engine"] == "vllm" and card["status"] == "ready"
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": "auto-ok", "messages": QUESTION, "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_vllms_prefix_cache_hits_are_reported_as_cached_tokens(server: ServerProcess) -> None:
    """vLLM's ``num_cached_tokens`` as ``usage.prompt_tokens_details.cached_tokens``: 0, then a shared prefix."""
    system = {"role": "system", "content": " ".join(["Notes on vLLM: the quick brown fox jumps over a dog."] * 16)}
    usages = []
    for question in ("hello", "what is the capital of France?"):
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "model": "auto-ok", "messages": [system, {"role": "user", "content": question}], "max_tokens": 2})
        assert r.status_code == 200, r.text
        usages.append(r.json()["usage"])
    assert usages[0]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert 0 < usages[1]["prompt_tokens_details"]["cached_tokens"] < usages[1]["prompt_tokens"], usages
    deadline = time.monotonic() + 60  # vLLM's stat logger runs after the step: poll, never race it
    while (hits := _prefix_hits(server)) < usages[1]["prompt_tokens_details"]["cached_tokens"]:
        assert time.monotonic() < deadline, f"/metrics counted {hits} prefix-cache hit tokens"
        time.sleep(0.2)


def _prefix_hits(server: ServerProcess) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "inhouse_engine_prefix_cache_hit_tokens_total" and s.labels.get("model") == "auto-ok")


def test_auto_falls_back_to_transformers_with_a_warning(server: ServerProcess) -> None:
    card = httpx.get(server.url + "/v1/models/auto-fallback", timeout=10).json()
    assert card["engine"] == "transformers" and card["status"] == "ready"
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": "auto-fallback", "messages": QUESTION, "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    log = server.log_path.read_text(errors="replace")
    assert "model auto-fallback: vLLM could not serve it, falling back to the transformers engine" in log
    assert "InhouseExperimentalForCausalLM" in log


def test_explicit_vllm_refusals_name_the_model_and_the_fix(server: ServerProcess) -> None:
    health = httpx.get(server.url + "/health", timeout=10).json()["models"]
    refused = health["vllm-refused"]
    assert refused["state"] == "failed"
    assert "'vllm-refused'" in refused["error"] and "InhouseExperimentalForCausalLM" in refused["error"]
    assert "engine: transformers" in refused["error"]
    memory = health["too-much-kv"]
    assert memory["state"] == "failed"
    assert "'too-much-kv'" in memory["error"] and "Lower kv_cache_gib" in memory["error"]
    assert "Traceback" not in refused["error"] + memory["error"]
    r = httpx.post(server.url + "/v1/chat/completions", timeout=10,
                   json={"model": "vllm-refused", "messages": QUESTION})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable"


def test_a_json_schema_answer_validates_on_vllm(server: ServerProcess) -> None:
    """The tiny random model answers valid JSON only because vLLM's structured outputs constrain it."""
    card = httpx.get(server.url + "/v1/models/auto-ok", timeout=10).json()
    assert card["engine"] == "vllm"
    for seed in range(2):
        r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
            "model": "auto-ok", "messages": [{"role": "user", "content": "The weather in Paris?"}],
            "max_tokens": 120, "seed": seed, "temperature": 0.8,
            "response_format": {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA}}})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        jsonschema_rs.validate(SCHEMA, json.loads(choice["message"]["content"]))


def test_a_schema_vllm_cannot_enforce_is_a_400_naming_it(server: ServerProcess) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "nonsense"}}}
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "auto-ok", "messages": QUESTION, "max_tokens": 5,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "response_format.json_schema.schema"
    assert "nonsense" in error["message"]
    after = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                       json={"model": "auto-ok", "messages": QUESTION, "max_tokens": 2, "ignore_eos": True})
    assert after.status_code == 200  # nothing was admitted and left behind


def test_a_required_tool_call_on_a_template_without_tools(server: ServerProcess) -> None:
    """The tiny model's template knows no tools: vLLM constrains its answer to the tools envelope."""
    r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
        "model": "auto-ok", "messages": [{"role": "user", "content": "The weather in Paris?"}],
        "max_tokens": 100, "tools": [WEATHER], "tool_choice": "required"})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    call = choice["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather"
    assert isinstance(json.loads(call["function"]["arguments"])["city"], str)


@pytest.mark.parametrize(("adapter", "base", "engine"), [("lora-on-auto", "auto-ok", "vllm"),
                                                         ("lora-on-fallback", "auto-fallback", "transformers")])
def test_an_adapter_over_an_auto_base_serves_on_the_engine_auto_picked(server: ServerProcess, adapter: str,
                                                                       base: str, engine: str) -> None:
    assert httpx.get(server.url + f"/v1/models/{adapter}", timeout=10).json()["engine"] == f"{engine}+lora"
    answers = []
    for model in (adapter, base):
        r = httpx.post(server.url + "/v1/completions", timeout=120, json={
            "model": model, "prompt": [5, 17, 99, 230, 41], "max_tokens": 8, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        answers.append(r.json()["choices"][0]["text"])
    assert answers[0] != answers[1], "the adapter changes the base's greedy answer"
