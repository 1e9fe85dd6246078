"""LoRA adapters on the vLLM engine through the real CLI (``.venv-vllm``): the config's ``base:``/``adapter:`` entries
over an ``engine: vllm`` model become vLLM's own multi-LoRA, and every adapter answers exactly PEFT's greedy
tokens, alone and in one concurrent mix of four adapters and the bare base (whose rows must stay the base's:
vLLM 0.32's CPU LoRA ops would give them an adapter, see inhouse/engine/vllm_lora.py); ``max_loras: 2`` makes
vLLM cycle adapters through its slots meanwhile.  Runtime load/unload go through ``/admin/adapters``; adapters
vLLM cannot serve (wrong shapes, a rank above ``max_lora_rank``) are clean 400s and vLLM keeps serving; a key
scoped to an adapter works, and the audit rows and metrics name the adapter; a swap of the base moves the
adapters to the new vLLM engine."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.e2e.helpers import assert_error, audit_rows, new_key
from tests.process import ADMIN_KEY, REPO, ServerProcess
from tests.tiny_lora import RECIPES, AdapterRecipe, build_adapter, peft_greedy, wrong_shape_copy

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
TOKENS = 10
PROMPTS = ([5, 17, 99, 230, 41], [300, 12, 7], [88, 88, 150, 420, 9, 61, 3], [250, 4])
DECLARED = RECIPES[:3]  # in the config (ranks 4, 8, 16: vLLM starts with max_lora_rank 16); the fourth at runtime
RANK_32 = AdapterRecipe("lora-r32", 32, 32, ("q_proj",), 5)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, cache_dir: Path) -> dict[str, Path]:
    return {r.name: build_adapter(tiny_model_dir, r, cache_dir / f"tiny-lora-{r.name}") for r in (*RECIPES, RANK_32)}


@pytest.fixture(scope="module")
def server(vllm_python: str, tiny_model_dir: Path, adapters: dict[str, Path], cache_dir: Path, logs_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    models: list[dict[str, Any]] = [{"name": "tiny", "engine": "vllm", "path": str(tiny_model_dir),
                                     "dtype": "float32", "max_num_seqs": 8, "max_loras": 2}]
    models += [{"name": r.name, "base": "tiny", "adapter": str(adapters[r.name])} for r in DECLARED]
    config = tmp_path_factory.mktemp("vllm-lora-config") / "inhouse.yaml"
    config.write_text(yaml.safe_dump({"models": models}))
    with ServerProcess(["--config", str(config)], cache_dir, logs_dir / "vllm-lora.log", auth=True,
                       ready_timeout=600, python=vllm_python) as proc:
        yield proc


def answer(sdk: openai.OpenAI, model: str, prompt: list[int]) -> str:
    completion = sdk.completions.create(model=model, prompt=prompt, max_tokens=TOKENS, temperature=0,
                                        extra_body={"ignore_eos": True})
    assert completion.usage is not None and completion.usage.completion_tokens == TOKENS
    return completion.choices[0].text.replace("\ufffd", "")


def peft_text(tiny: Path, ids: list[int]) -> tuple[str, str]:
    """What vLLM's text of PEFT's tokens ``ids`` lies between: the text of all but the last three, and the text of
    all (U+FFFD removed).  vLLM holds back the bytes of an unfinished character, and at the end some whole text
    sharing a token with them, so the last tokens' text may be missing; any other token makes another text."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny, local_files_only=True)
    return tuple(str(tokenizer.decode(part)).replace("\ufffd", "") for part in (ids[:-3], ids))  # type: ignore


def agrees(got: str, want: tuple[str, str]) -> bool:
    return got.startswith(want[0]) and want[1].startswith(got)


def cli(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "inhouse", "adapters", *args, "--url", server.url, "--key",
                           ADMIN_KEY], capture_output=True, text=True, timeout=600, cwd=REPO)


def test_the_cards_name_vllm_lora(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, headers=ADMIN, timeout=30) as admin:
        assert admin.get("/v1/models/tiny").json()["engine"] == "vllm"
        assert admin.get("/v1/models/lora-qv").json()["engine"] == "vllm+lora"


def test_runtime_load_then_four_adapters_and_the_base_at_once_equal_peft(
        server: ServerProcess, tiny_model_dir: Path, adapters: dict[str, Path]) -> None:
    extra = RECIPES[3].name
    loaded = cli(server, "load", extra, "--base", "tiny", "--path", str(adapters[extra]))
    assert loaded.returncode == 0, loaded.stderr
    listed = cli(server, "list")
    assert listed.returncode == 0 and all(r.name in listed.stdout for r in RECIPES), listed.stdout
    names: list[str] = [r.name for r in RECIPES] + ["tiny"]
    rows = [(names[i % len(names)], PROMPTS[i % len(PROMPTS)]) for i in range(10)]
    expected = [peft_text(tiny_model_dir, peft_greedy(tiny_model_dir, adapters.get(n), p, TOKENS)) for n, p in rows]
    assert len({e[0] for e in expected}) > 5  # the adapters visibly change the answers
    with openai.OpenAI(base_url=server.url + "/v1", api_key=ADMIN_KEY, max_retries=0) as sdk, \
            ThreadPoolExecutor(10) as pool:
        for (name, prompt), want in zip(rows, expected, strict=True):  # each alone
            got = answer(sdk, name, prompt)
            assert agrees(got, want), (name, got, want)
        for _ in range(2):  # all at once, twice: vLLM swaps adapters through its two slots meanwhile
            together = list(pool.map(lambda row: answer(sdk, *row), rows))
            for (name, _), want, have in zip(rows, expected, together, strict=True):
                assert agrees(have, want), (name, have, want)


def test_adapters_vllm_cannot_serve_are_400s_and_vllm_serves_on(server: ServerProcess, adapters: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    source = adapters["lora-qv"]
    wrong_shape_copy(source, tmp_path)
    with httpx.Client(base_url=server.url, headers=ADMIN, timeout=120) as admin:
        shape = admin.post("/admin/adapters", json={"name": "bad", "base": "tiny", "path": str(tmp_path)})
        error = assert_error(shape, 400, "invalid_request")
        assert "model.layers.0.self_attn.q_proj" in error["message"] and "(77, 4)" in error["message"], error
        rank = admin.post("/admin/adapters", json={"name": "big", "base": "tiny", "path": str(adapters["lora-r32"])})
        error = assert_error(rank, 400, "invalid_request")
        assert "rank 32" in error["message"] and "max_lora_rank 16" in error["message"], error
        missing = admin.post("/admin/adapters", json={"name": "bad", "base": "tiny", "path": str(tmp_path / "no")})
        assert str(tmp_path / "no") in assert_error(missing, 400, "invalid_request")["message"]
        for name in ("bad", "big"):
            assert_error(admin.post("/v1/completions", json={"model": name, "prompt": "hi"}), 404, "model_not_found")
        ok = admin.post("/v1/completions", json={"model": "lora-mlp", "prompt": [5, 6], "max_tokens": 3})
        assert ok.status_code == 200, ok.text


def test_unload_waits_for_the_adapters_requests_in_flight(server: ServerProcess, adapters: dict[str, Path]) -> None:
    assert cli(server, "load", "churn", "--base", "tiny", "--path", str(adapters["lora-all"])).returncode == 0
    started = [threading.Event() for _ in range(4)]

    def stream(model: str, first: threading.Event) -> tuple[int, bool]:
        """Status, and whether the stream ended with [DONE]; ``first`` is set once the first token arrived."""
        with httpx.Client(base_url=server.url, headers=ADMIN, timeout=300) as client, client.stream(
                "POST", "/v1/completions", json={"model": model, "prompt": [5, 6, 7], "max_tokens": 32,
                                                 "ignore_eos": True, "stream": True}) as r:
            lines = []
            for line in r.iter_lines():
                first.set()
                lines.append(line)
            return r.status_code, lines[-1:] == ["data: [DONE]"] or "data: [DONE]" in lines

    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(stream, m, e) for m, e in zip(("churn", "churn", "tiny", "lora-qv"), started,
                                                               strict=True)]
        for event in started:
            assert event.wait(300)
        unloaded = cli(server, "unload", "churn")  # returns once the two churn streams have ended
        assert unloaded.returncode == 0, unloaded.stderr
        assert [f.result() for f in running] == [(200, True)] * 4
    gone = httpx.post(server.url + "/v1/completions", headers=ADMIN, timeout=60,
                      json={"model": "churn", "prompt": [5, 6], "max_tokens": 4})
    assert_error(gone, 404, "model_not_found")
    after = httpx.post(server.url + "/v1/completions", headers=ADMIN, timeout=60,
                       json={"model": "tiny", "prompt": [5, 6], "max_tokens": 4})
    assert after.status_code == 200, after.text


def test_a_key_scoped_to_an_adapter_and_the_audit_and_metrics_name_it(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, headers=ADMIN, timeout=60) as admin:
        key = new_key(admin, models=["lora-mlp"])
        headers = {"Authorization": f"Bearer {key['secret']}"}
        ok = httpx.post(server.url + "/v1/completions", headers=headers, timeout=60,
                        json={"model": "lora-mlp", "prompt": [5, 6], "max_tokens": 3})
        assert ok.status_code == 200, ok.text
        assert ok.json()["model"] == "lora-mlp"
        base = httpx.post(server.url + "/v1/completions", headers=headers, timeout=60,
                          json={"model": "tiny", "prompt": [5, 6], "max_tokens": 3})
        assert base.status_code in (403, 404), base.text
        rows = audit_rows(admin, "lora-mlp", key["id"])
        assert rows and all(r["model"] == "lora-mlp" for r in rows)
        assert 'model="lora-mlp"' in admin.get("/metrics").text


def test_a_base_swap_moves_the_adapters_to_the_new_vllm_engine(server: ServerProcess, tiny_model_dir: Path,
                                                                adapters: dict[str, Path]) -> None:
    """Last in the module: the new base is a second vLLM engine, started with LoRA for the adapters over it."""
    prompt = PROMPTS[0]
    want = peft_text(tiny_model_dir, peft_greedy(tiny_model_dir, adapters["lora-all"], prompt, TOKENS))
    with httpx.Client(base_url=server.url, headers=ADMIN, timeout=600) as admin:
        swapped = admin.post("/admin/models/tiny/swap", json={"version": "v2"})
        assert swapped.status_code == 200, swapped.text
        assert swapped.json()["outcome"] == "swapped"
        assert admin.get("/admin/models/tiny").json()["versions"] == ["v2"]
        assert {a["name"] for a in admin.get("/admin/adapters").json()["data"]} >= {"lora-qv", "lora-mlp", "lora-all"}
    with openai.OpenAI(base_url=server.url + "/v1", api_key=ADMIN_KEY, max_retries=0) as sdk:
        got = answer(sdk, "lora-all", prompt)
    assert agrees(got, want), (got, want)
