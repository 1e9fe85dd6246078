"""LoRA adapters through the real CLI: adapters declared in the config and loaded at runtime answer exactly
PEFT's own greedy tokens (openai SDK), eight concurrent requests over four adapters and the base batch
together, load and unload under a client loop fail no request, bad adapters get clean 400s naming the
problem, keys scoped to an adapter work like any model's, and the audit rows name the adapter."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
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
from tests.tiny_lora import RECIPES, build_adapter, peft_greedy, wrong_shape_copy

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
TOKENS = 10
PROMPTS = ([5, 17, 99, 230, 41], [300, 12, 7], [88, 88, 150, 420, 9, 61, 3], [250, 4])
DECLARED = RECIPES[:3]  # in the config; the fourth is loaded at runtime


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, cache_dir: Path) -> dict[str, Path]:
    return {r.name: build_adapter(tiny_model_dir, r, cache_dir / f"tiny-lora-{r.name}") for r in RECIPES}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, adapters: dict[str, Path], cache_dir: Path, logs_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    models: list[dict[str, Any]] = [{"name": "tiny", "engine": "transformers", "path": str(tiny_model_dir),
                                     "dtype": "float32", "max_num_seqs": 8, "max_loras": 8}]
    models += [{"name": r.name, "base": "tiny", "adapter": str(adapters[r.name])} for r in DECLARED]
    config = tmp_path_factory.mktemp("lora-config") / "inhouse.yaml"
    config.write_text(yaml.safe_dump({"models": models}))
    with ServerProcess(["--config", str(config)], cache_dir, logs_dir / "lora.log", auth=True) as proc:
        yield proc


def tokens(sdk: openai.OpenAI, model: str, prompt: list[int]) -> list[str]:
    answer = sdk.completions.create(model=model, prompt=prompt, max_tokens=TOKENS, temperature=0, logprobs=0,
                                    extra_body={"ignore_eos": True})
    logprobs = answer.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None
    return list(logprobs.tokens)


def texts(tiny: Path, ids: list[int]) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny, local_files_only=True)
    return [tokenizer.decode([t]) for t in ids]


def cli(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "inhouse", "adapters", *args, "--url", server.url, "--key",
                           ADMIN_KEY], capture_output=True, text=True, timeout=600, cwd=REPO)


def test_runtime_load_then_one_batch_of_four_adapters_and_the_base_equals_peft(
        server: ServerProcess, tiny_model_dir: Path, adapters: dict[str, Path]) -> None:
    extra = RECIPES[3].name
    loaded = cli(server, "load", extra, "--base", "tiny", "--path", str(adapters[extra]))
    assert loaded.returncode == 0, loaded.stderr
    listed = cli(server, "list")
    assert listed.returncode == 0 and all(r.name in listed.stdout for r in RECIPES), listed.stdout
    names: list[str] = [r.name for r in RECIPES] + ["tiny"]
    rows = [(names[i % len(names)], PROMPTS[i % len(PROMPTS)]) for i in range(8)]
    expected = [texts(tiny_model_dir, peft_greedy(tiny_model_dir, adapters.get(n), p, TOKENS)) for n, p in rows]
    assert len({tuple(e) for e in expected}) > 4  # the adapters visibly change the answers
    with openai.OpenAI(base_url=server.url + "/v1", api_key=ADMIN_KEY, max_retries=0) as sdk, \
            ThreadPoolExecutor(8) as pool:
        for (name, prompt), want in zip(rows, expected, strict=True):  # each alone
            assert tokens(sdk, name, prompt) == want, name
        got = list(pool.map(lambda row: tokens(sdk, *row), rows))  # all at once
    for (name, _), want, have in zip(rows, expected, got, strict=True):
        assert have == want, name


def test_a_wrong_shape_adapter_is_400_naming_the_module(server: ServerProcess, adapters: dict[str, Path],
                                                        tmp_path: Path) -> None:
    source = adapters["lora-qv"]
    wrong_shape_copy(source, tmp_path)
    with httpx.Client(base_url=server.url, headers=ADMIN, timeout=120) as admin:
        r = admin.post("/admin/adapters", json={"name": "bad", "base": "tiny", "path": str(tmp_path)})
        error = assert_error(r, 400, "invalid_request")
        assert "model.layers.0.self_attn.q_proj" in error["message"] and "(77, 4)" in error["message"], error
        missing = admin.post("/admin/adapters", json={"name": "bad", "base": "tiny", "path": str(tmp_path / "no")})
        assert str(tmp_path / "no") in assert_error(missing, 400, "invalid_request")["message"]
        wrong_base = admin.post("/admin/adapters", json={"name": "bad", "base": "nope", "path": str(source)})
        assert_error(wrong_base, 400, "invalid_request", param="base")
        assert admin.post("/v1/completions", json={"model": "bad", "prompt": "hi"}).status_code == 404
        assert admin.delete("/admin/adapters/tiny").status_code == 400  # the base is no adapter


def test_load_and_unload_under_load_fail_no_request(server: ServerProcess, adapters: dict[str, Path]) -> None:
    failures: list[str] = []
    done = [0]
    stop = threading.Event()

    def loop(model: str) -> None:
        with httpx.Client(base_url=server.url, headers=ADMIN, timeout=120) as client:
            while not stop.is_set():
                r = client.post("/v1/completions", json={"model": model, "prompt": [5, 6, 7], "max_tokens": 8})
                if r.status_code != 200:
                    failures.append(f"{model}: HTTP {r.status_code} {r.text[:200]}")
                done[0] += 1

    threads = [threading.Thread(target=loop, args=(m,), daemon=True) for m in ("tiny", "lora-qv", "lora-mlp")]
    for thread in threads:
        thread.start()
    try:
        for i in range(3):
            name = f"churn-{i}"
            assert cli(server, "load", name, "--base", "tiny", "--path", str(adapters["lora-all"])).returncode == 0
            with httpx.Client(base_url=server.url, headers=ADMIN, timeout=120) as client:
                r = client.post("/v1/completions", json={"model": name, "prompt": [5, 6], "max_tokens": 4})
                assert r.status_code == 200, r.text
            unloaded = cli(server, "unload", name)
            assert unloaded.returncode == 0, unloaded.stderr
            gone = httpx.post(server.url + "/v1/completions", headers=ADMIN, timeout=60,
                              json={"model": name, "prompt": [5, 6], "max_tokens": 4})
            assert_error(gone, 404, "model_not_found")
        deadline = time.monotonic() + 120
        while done[0] < 12 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)
    assert done[0] >= 12
    assert failures == []


def test_a_key_scoped_to_an_adapter_uses_it_and_the_audit_names_it(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, headers=ADMIN, timeout=60) as admin:
        key = new_key(admin, models=["lora-qv"])
        headers = {"Authorization": f"Bearer {key['secret']}"}
        ok = httpx.post(server.url + "/v1/completions", headers=headers, timeout=60,
                        json={"model": "lora-qv", "prompt": [5, 6], "max_tokens": 3})
        assert ok.status_code == 200, ok.text
        assert ok.json()["model"] == "lora-qv"
        base = httpx.post(server.url + "/v1/completions", headers=headers, timeout=60,
                          json={"model": "tiny", "prompt": [5, 6], "max_tokens": 3})
        assert base.status_code in (403, 404), base.text
        rows = audit_rows(admin, "lora-qv", key["id"])
        assert rows and all(r["model"] == "lora-qv" for r in rows)
