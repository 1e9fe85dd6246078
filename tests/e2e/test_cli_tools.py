"""The operator's CLI tools, run as the real ``inhouse`` command: ``doctor`` on good and broken configs,
``models list`` and ``bench`` against a running server, and ``bench`` of a local checkpoint in process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.process import ADMIN_KEY, REPO, ServerProcess, free_port

pytestmark = pytest.mark.slow


def inhouse(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "inhouse", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


# ------------------------------------------------------------------------------------------------- doctor


def test_doctor_fails_on_a_missing_model_and_an_unreachable_redis(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = tmp_path / "inhouse.yaml"
    config.write_text(f"""
port: {free_port()}
redis_url: redis://127.0.0.1:{free_port()}/0
models:
  - name: gone
    engine: transformers
    path: models/not-downloaded-yet
  - name: tiny
    engine: transformers
    path: {tiny_model_dir}
    dtype: float32
""", encoding="utf-8")
    env = {"INHOUSE_STATE_DIR": str(tmp_path / "state")}
    proc = inhouse("doctor", "--config", str(config), "--json", env=env)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"] is False
    gone = checks["model gone"]
    assert gone["status"] == "fail" and f"{config}: models.0.path" in gone["detail"]
    assert "does not exist" in gone["detail"] and "path" in gone["fix"]
    assert checks["redis"]["status"] == "fail" and "redis_url" in checks["redis"]["fix"]
    for ok in ("python", "torch", "config", "model tiny", "memory", "database", "port", "vllm"):
        assert checks[ok]["status"] == "ok", checks[ok]
    text = inhouse("doctor", "--config", str(config), env=env)
    assert text.returncode == 1
    assert "[FAIL] model gone" in text.stdout and "fix: correct path, or copy the model there" in text.stdout
    assert "2 problems to fix" in text.stdout


def test_doctor_names_the_file_and_key_of_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("models:\n  - name: a\n    engine: fake\n    max_num_seqs: 0\n", encoding="utf-8")
    proc = inhouse("doctor", "--config", str(config), "--json", env={"INHOUSE_STATE_DIR": str(tmp_path)})
    assert proc.returncode == 1
    check = next(c for c in json.loads(proc.stdout)["checks"] if c["name"] == "config")
    assert check["status"] == "fail" and str(config) in check["detail"] and "models.0.max_num_seqs" in check["detail"]


def test_doctor_passes_a_good_config(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = tmp_path / "inhouse.yaml"
    model = f"{{name: tiny, engine: transformers, path: {tiny_model_dir}}}"
    config.write_text(f"port: {free_port()}\nmodels:\n  - {model}\n", encoding="utf-8")
    proc = inhouse("doctor", "--config", str(config), env={"INHOUSE_STATE_DIR": str(tmp_path / "state")})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ready to serve" in proc.stdout and "[FAIL]" not in proc.stdout


# ------------------------------------------------------------------------------- against a running server


@pytest.fixture(scope="module")
def fake_server(cache_dir: Path, logs_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("cli-tools")
    (folder / "inhouse.yaml").write_text("""
models:
  - name: scripted
    engine: fake
    fake_reply: "one two three four five six seven eight"
  - name: scripted
    engine: fake
    deployment: second
    fake_reply: "one two three four five six seven eight"
  - name: broken
    engine: fake
    fake_fail_after: 1
""", encoding="utf-8")
    with ServerProcess(["--config", str(folder / "inhouse.yaml")], cache_dir, logs_dir / "cli-tools.log",
                       auth=True) as server:
        yield server


def test_models_list_prints_a_table_and_json(fake_server: ServerProcess) -> None:
    proc = inhouse("models", "list", "--url", fake_server.url, "--key", ADMIN_KEY)
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert header.split()[:3] == ["MODEL", "STATE", "DEPLOYMENT"]
    assert sorted(r.split()[0] for r in rows) == ["broken", "scripted", "scripted"]
    assert any("second" in r and "ready" in r for r in rows)
    listing = json.loads(inhouse("models", "list", "--url", fake_server.url, "--key", ADMIN_KEY, "--json").stdout)
    assert {m["id"]: len(m["deployments"]) for m in listing["data"]} == {"scripted": 2, "broken": 1}


def test_models_list_without_a_key_is_refused(fake_server: ServerProcess) -> None:
    proc = inhouse("models", "list", "--url", fake_server.url, env={"INHOUSE_ADMIN_KEY": ""})
    assert proc.returncode == 1 and proc.stderr.startswith("inhouse: ")


def test_bench_over_http_measures_each_level(fake_server: ServerProcess) -> None:
    proc = inhouse("bench", "--url", fake_server.url, "--key", ADMIN_KEY, "--model", "scripted", "--concurrency",
                   "1,2", "--requests", "3", "--max-tokens", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["target"] == {"kind": "server", "url": fake_server.url, "model": "scripted"}
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 2]
    for level in report["levels"]:
        assert level["errors"] == 0 and level["requests"] == 3 and level["output_tokens"] == 3 * 4
        assert level["tokens_per_s"] > 0 and level["ttft_p50_ms"] is not None


def test_bench_table_and_a_failing_model(fake_server: ServerProcess) -> None:
    table = inhouse("bench", "--url", fake_server.url, "--key", ADMIN_KEY, "--concurrency", "2", "--requests", "2",
                    "--max-tokens", "3")
    assert table.returncode == 0, table.stderr
    assert "CONCURRENCY" in table.stdout and "TTFT P50 MS" in table.stdout
    broken = inhouse("bench", "--url", fake_server.url, "--key", ADMIN_KEY, "--model", "broken", "--concurrency", "1",
                     "--requests", "2", "--max-tokens", "3")
    assert broken.returncode == 1 and "2 of 2 requests failed" in broken.stderr
    nobody = inhouse("bench", "--url", f"http://127.0.0.1:{free_port()}", "--requests", "1")
    assert nobody.returncode == 2 and "cannot reach" in nobody.stderr


def test_bench_of_a_local_checkpoint_in_process(tiny_model_dir: Path, cache_dir: Path) -> None:
    proc = inhouse("bench", "--path", str(tiny_model_dir), "--engine", "transformers", "--dtype", "float32",
                   "--concurrency", "2", "--requests", "4", "--max-tokens", "5", "--json",
                   env={"INHOUSE_CACHE_DIR": str(cache_dir)})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["target"]["kind"] == "in-process" and report["target"]["engine"] == "transformers"
    (level,) = report["levels"]
    assert level["errors"] == 0 and level["output_tokens"] == 4 * 5
