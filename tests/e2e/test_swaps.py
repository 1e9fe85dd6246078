"""Health-gated swaps through the real CLI, under load: a client loop of concurrent streaming and blocking
requests runs across a swap, a failed swap (a corrupt checkpoint), a refused swap (too big), a canary that
is rolled back, a rollback, and a reload (admin API and SIGHUP).  Zero requests fail (outside the erroring
canary's own share), every stream ends with [DONE], and the audit rows carry the version that answered,
changing at the switch.  One model is the fake engine (fast), one a real tiny transformers checkpoint.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.process import ADMIN_KEY, REPO, ServerProcess

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
REPLY = "one two three four five six seven eight nine ten eleven twelve"


def _config(tiny: Path, chat: dict[str, Any] | None = None,
            extra: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    chat = chat or {"name": "chat", "engine": "fake", "fake_reply": REPLY, "fake_token_delay": 0.01,
                    "version": "v1"}
    tiny_spec = {"name": "tiny", "engine": "transformers", "path": str(tiny), "dtype": "float32",
                 "smoke": {"prompts": ["hello", "what is the capital of France?"], "max_latency_s": 60}}
    return {"models": [chat, tiny_spec, *(extra or [])],
            "swap": {"drain_s": 60, "canary_window_s": 4, "canary_min_requests": 3}}


@dataclass
class Load:
    """Client threads, streaming and blocking, asking ``models`` until stopped; every failure is kept."""

    url: str
    models: tuple[str, ...]
    done: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for model in self.models:
            for streaming in (True, False):
                thread = threading.Thread(target=self._loop, args=(model, streaming), daemon=True)
                thread.start()
                self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)

    def wait(self, requests: int) -> None:
        """Until ``requests`` more requests completed (whatever their outcome)."""
        target, deadline = self.done + requests, time.monotonic() + 120
        while self.done < target:
            assert time.monotonic() < deadline, "the load made no progress"
            time.sleep(0.05)

    def _loop(self, model: str, streaming: bool) -> None:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16,
                "stream": streaming}
        with httpx.Client(base_url=self.url, headers=ADMIN, timeout=120) as client:
            while not self._stop.is_set():
                try:
                    problem = self._one(client, body)
                except httpx.HTTPError as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                if problem is not None:
                    self.failures.append(f"{model} stream={streaming}: {problem}")
                self.done += 1

    @staticmethod
    def _one(client: httpx.Client, body: dict[str, Any]) -> str | None:
        if not body["stream"]:
            r = client.post("/v1/chat/completions", json=body)
            if r.status_code != 200:
                return f"HTTP {r.status_code}: {r.text[:300]}"
            answer = r.json()
            choice = answer["choices"][0]
            # a random tiny model sometimes samples its end-of-sequence token first: one token, no text, complete
            said = choice["message"]["content"] or answer["usage"]["completion_tokens"] >= 1
            return None if choice["finish_reason"] and said else f"incomplete: {answer}"
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            raw = r.read().decode()
        if r.status_code != 200:
            return f"HTTP {r.status_code}: {raw[:300]}"
        events = [line[6:] for line in raw.split("\n\n") if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return f"the stream did not end with [DONE]: {raw[-300:]!r}"
        errors = [e for e in events[:-1] if '"error"' in e]
        return f"error event: {errors[0][:300]}" if errors else None


def cli(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "inhouse", *args, "--url", server.url, "--key", ADMIN_KEY],
                          capture_output=True, text=True, timeout=600, cwd=REPO)


def version(server: ServerProcess, model: str) -> str:
    card = httpx.get(f"{server.url}/v1/models/{model}", headers=ADMIN, timeout=10).json()
    return str(card["version"])


def audit(server: ServerProcess, model: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{server.url}/admin/audit", params={"model": model, "limit": 10000}, headers=ADMIN, timeout=30)
    r.raise_for_status()
    return sorted(r.json()["data"], key=lambda row: row["seq"])


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model, an identical copy (another version: its files are newer), and a corrupt copy."""
    root = tmp_path_factory.mktemp("checkpoints")
    old, new, corrupt = (shutil.copytree(tiny_model_dir, root / n) for n in ("old", "new", "corrupt"))
    (corrupt / "config.json").write_text('{"model_type": "llama", "hidden_size": ')  # cut off mid-file
    weights = next(corrupt.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    huge = root / "huge"
    huge.mkdir()
    shutil.copy(tiny_model_dir / "config.json", huge / "config.json")
    with (huge / "model.safetensors").open("wb") as f:
        f.truncate(1 << 40)  # sparse: a tebibyte of "weights" that takes no disk
    return {"old": Path(old), "new": Path(new), "corrupt": Path(corrupt), "huge": huge}


@pytest.fixture(scope="module")
def server(checkpoints: dict[str, Path], cache_dir: Path, logs_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    config = tmp_path_factory.mktemp("swap-config") / "inhouse.yaml"
    config.write_text(yaml.safe_dump(_config(checkpoints["old"])))
    with ServerProcess(["--config", str(config)], cache_dir, logs_dir / "swaps.log", auth=True) as proc:
        proc.config = config  # type: ignore[attr-defined]
        yield proc


def test_a_swap_under_load_fails_no_request_and_the_audit_version_changes_at_the_switch(
        server: ServerProcess) -> None:
    assert version(server, "chat") == "v1"
    with Load(server.url, ("chat",)) as load:
        load.wait(20)
        started = time.time()
        done = cli(server, "models", "swap", "chat", "--version", "v2", "--set", "fake_reply=\"v2 says hi\"")
        finished = time.time()
        load.wait(20)
    assert done.returncode == 0, done.stderr
    assert load.failures == []
    assert version(server, "chat") == "v2"
    rows = [r for r in audit(server, "chat") if r["path"] == "/v1/chat/completions"]
    assert {r["model_version"] for r in rows} == {"v1", "v2"}
    assert all(r["model_version"] == "v1" for r in rows if r["at"] < started)
    assert all(r["model_version"] == "v2" for r in rows if r["at"] > finished)
    assert httpx.get(f"{server.url}/admin/audit/verify", headers=ADMIN, timeout=30).json()["ok"]


def test_a_corrupt_checkpoint_is_refused_and_the_old_version_keeps_serving(
        server: ServerProcess, checkpoints: dict[str, Path]) -> None:
    before = version(server, "tiny")
    with Load(server.url, ("chat", "tiny")) as load:
        load.wait(10)
        failed = cli(server, "models", "swap", "tiny", "--path", str(checkpoints["corrupt"]))
        load.wait(10)
    assert failed.returncode == 1
    assert "swap of model 'tiny' refused" in failed.stderr and f"{before} keeps serving" in failed.stderr
    assert load.failures == []
    assert version(server, "tiny") == before
    status = httpx.get(f"{server.url}/admin/models/tiny", headers=ADMIN, timeout=10).json()
    assert status["last_swap"]["outcome"] == "failed"
    # the same refusal through the API is OpenAI-shaped
    r = httpx.post(f"{server.url}/admin/models/tiny/swap", json={"path": str(checkpoints["corrupt"])},
                   headers=ADMIN, timeout=300)
    assert r.status_code == 409 and r.json()["error"]["code"] == "swap_failed"


def test_a_swap_that_would_not_fit_in_memory_is_refused_before_loading(
        server: ServerProcess, checkpoints: dict[str, Path]) -> None:
    refused = cli(server, "models", "swap", "tiny", "--path", str(checkpoints["huge"]))
    assert refused.returncode == 1
    assert "not enough memory" in refused.stderr and "GiB" in refused.stderr


def test_a_real_checkpoint_swaps_under_load_and_rolls_back(
        server: ServerProcess, checkpoints: dict[str, Path]) -> None:
    before = version(server, "tiny")
    with Load(server.url, ("tiny",)) as load:
        load.wait(6)
        swapped = cli(server, "models", "swap", "tiny", "--path", str(checkpoints["new"]), "--json")
        load.wait(6)
        assert swapped.returncode == 0, swapped.stderr
        after = json.loads(swapped.stdout)["to"]
        assert after != before and version(server, "tiny") == after
        back = cli(server, "models", "rollback", "tiny")
        load.wait(6)
    assert back.returncode == 0, back.stderr
    assert load.failures == []
    assert version(server, "tiny") == before
    assert {before, after} <= {r["model_version"] for r in audit(server, "tiny")}


def test_a_canary_that_errors_is_rolled_back(server: ServerProcess) -> None:
    old = version(server, "chat")
    with Load(server.url, ("chat",)) as load:
        load.wait(10)
        # fails after 8 tokens: the smoke check (8 tokens) passes, the clients' 16-token answers do not
        canary = cli(server, "models", "swap", "chat", "--version", "bad", "--set", "fake_fail_after=8",
                     "--set", f"fake_reply={json.dumps(REPLY)}", "--canary", "40%", "--window", "30", "--json")
        rolled_back_at = time.time()
        load.wait(20)
    assert canary.returncode == 1
    result = json.loads(canary.stdout)
    assert result["outcome"] == "rolled_back" and "error rate" in result["reason"], result
    assert result["canary"]["errors"] > 0 and result["baseline"]["errors"] == 0
    # rolled back as soon as it failed on canary_min_requests (3) requests, not after the 30 s window
    assert result["ended_early"] is True and result["ended_after_s"] < 25, result
    assert version(server, "chat") == old
    rows = [r for r in audit(server, "chat") if r["path"] == "/v1/chat/completions"]
    failed = [r for r in rows if r["error_code"]]
    assert failed and all(r["model_version"] == "bad" for r in failed)  # only the canary's share failed
    assert all(r["model_version"] == old for r in rows if r["at"] > rolled_back_at)
    assert load.failures and all("fake engine failed" in f for f in load.failures), load.failures[:3]


def test_reload_and_sighup_apply_the_config_file_and_an_invalid_file_is_refused_whole(
        server: ServerProcess, checkpoints: dict[str, Path]) -> None:
    config: Path = server.config  # type: ignore[attr-defined]
    original = config.read_text()
    chat = {"name": "chat", "engine": "fake", "fake_reply": "reloaded " + REPLY, "fake_token_delay": 0.01,
            "version": "v3"}
    with Load(server.url, ("chat",)) as load:
        load.wait(10)
        config.write_text(yaml.safe_dump(_config(checkpoints["old"], chat, [{"name": "extra", "engine": "fake"}])))
        reloaded = cli(server, "reload", "--json")
        load.wait(10)
        assert reloaded.returncode == 0, reloaded.stderr
        report = json.loads(reloaded.stdout)
        assert "chat" in report["swapped"] and report["added"] == ["extra"], report
        assert version(server, "chat") == "v3"
        bad = yaml.safe_load(original)
        bad["models"][0]["fake_token_delay"] = "slow"
        config.write_text(yaml.safe_dump(bad))
        refused = cli(server, "reload")
        assert refused.returncode == 1 and "fake_token_delay" in refused.stderr, refused.stderr
        config.write_text(original)  # SIGHUP: back to the file's first models (extra goes, chat is v1)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while version(server, "chat") != "v1" or "extra" in _names(server):
            assert time.monotonic() < deadline, "SIGHUP did not apply the config file"
            time.sleep(0.2)
        load.wait(10)
    assert load.failures == []


def _names(server: ServerProcess) -> list[str]:
    return [m["id"] for m in httpx.get(f"{server.url}/v1/models", headers=ADMIN, timeout=10).json()["data"]]


def test_the_swap_api_needs_an_admin_key_and_refuses_bad_bodies_in_openai_shape(server: ServerProcess) -> None:
    url = f"{server.url}/admin/models/chat/swap"
    assert httpx.post(url, json={"path": "/x"}, timeout=10).status_code == 401
    made = httpx.post(f"{server.url}/admin/keys", json={"name": "app"}, headers=ADMIN, timeout=10).json()
    user = {"Authorization": f"Bearer {made['secret']}"}
    refused = httpx.post(url, json={"path": "/x"}, headers=user, timeout=10)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_required"
    for body, param in (({"name": "other"}, "name"), ({"canary": 0.1}, None), ({"fake_token_delay": "x"}, None),
                        ({"path": "/x", "canary": 2.0}, "canary"), ({"clamp_max_tokens": "yes"}, "clamp_max_tokens")):
        bad = httpx.post(url, json=body, headers=ADMIN, timeout=10)
        assert bad.status_code == 400, bad.text
        error = bad.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    missing = httpx.post(f"{server.url}/admin/models/nope/swap", json={"path": "/x"}, headers=ADMIN, timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    rollback = httpx.post(f"{server.url}/admin/models/extra-none/rollback", headers=ADMIN, timeout=10)
    assert rollback.status_code == 404
    bad_cli = cli(server, "models", "swap", "chat", "--canary", "150%")
    assert bad_cli.returncode == 2 and "between 0% and 100%" in bad_cli.stderr
