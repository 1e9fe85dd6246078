"""The gateway through real processes: fault-injecting upstreams (tests/fault_upstream.py), a second real
inhouse serving the tiny model, and the inhouse under test in front of them.

Covers retry then success, fallback when every deployment fails, the circuit breaker opening and
closing, health checks noticing a killed upstream and its return, weighted balancing, a stall before the
first token moving to another deployment, a mid-stream drop, a client disconnect reaching the upstream,
usage counted when the upstream sends none, and another inhouse as an upstream.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import TINY
from tests.e2e.helpers import assert_error, stream
from tests.process import REPO, ServerProcess, free_port

HI = [{"role": "user", "content": "hi"}]
REPLY = "Hello from the upstream server"


class Upstream:
    """One tests/fault_upstream.py process; ``script`` its next answers, read its ``log``."""

    def __init__(self, name: str, log_dir: Path) -> None:
        self.name, self.port, self.log_path = name, free_port(), log_dir / f"upstream-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Upstream:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.fault_upstream", "--port", str(self.port),
                                          "--name", self.name], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(self.url + "/v1/models", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                assert time.monotonic() < deadline, f"upstream {self.name} did not start"
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def script(self, *steps: dict) -> None:  # type: ignore[type-arg]
        httpx.post(self.url + "/_script", json=list(steps), timeout=5).raise_for_status()

    def log(self) -> list[dict]:  # type: ignore[type-arg]
        return httpx.get(self.url + "/_log", timeout=5).json()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def upstreams(logs_dir: Path) -> Iterator[dict[str, Upstream]]:
    ups = {name: Upstream(name, logs_dir).start() for name in ("a", "b", "c", "d", "e")}
    yield ups
    for up in ups.values():
        up.stop()


@pytest.fixture(scope="module")
def inner(tiny_model_dir: Path, cache_dir: Path, logs_dir: Path) -> Iterator[ServerProcess]:
    """A second, real inhouse serving the tiny model: an upstream like any other."""
    args = ["--engine", "transformers", "--model", str(tiny_model_dir), "--name", TINY, "--dtype", "float32"]
    with ServerProcess(args, cache_dir, logs_dir / "inner.log") as server:
        yield server


@pytest.fixture(scope="module")
def gateway(upstreams: dict[str, Upstream], inner: ServerProcess, tmp_path_factory: pytest.TempPathFactory,
            cache_dir: Path, logs_dir: Path) -> Iterator[ServerProcess]:
    a, b, c, d, e = (upstreams[n].url + "/v1" for n in "abcde")
    config = tmp_path_factory.mktemp("gateway") / "inhouse.yaml"
    config.write_text(f"""
routing: {{retries: 2, backoff_seconds: 0.05, circuit_failures: 3, circuit_window_seconds: 30,
          cooldown_seconds: 1.5, health_interval_seconds: 0.5, health_timeout_seconds: 0.5}}
models:
  - {{name: solo, engine: upstream, base_url: "{a}", upstream_model: up-model}}
  - {{name: pair, engine: upstream, base_url: "{b}", deployment: b, weight: 3, first_token_timeout: 1,
     upstream_model: up-model}}
  - {{name: pair, engine: upstream, base_url: "{c}", deployment: c, weight: 1, first_token_timeout: 1,
     upstream_model: up-model}}
  - {{name: flaky, engine: upstream, base_url: "{d}", deployment: d, fallbacks: [backup], upstream_model: up-model}}
  - {{name: backup, engine: fake, fake_reply: "answer from the backup"}}
  - {{name: watched, engine: upstream, base_url: "{e}", deployment: e, upstream_model: up-model}}
  - {{name: tiny, engine: upstream, base_url: "{inner.url}/v1", upstream_model: {TINY}}}
""", encoding="utf-8")
    with ServerProcess(["--config", str(config)], cache_dir, logs_dir / "gateway.log") as server:
        yield server


@pytest.fixture
def http(gateway: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        yield client


def chat(http: httpx.Client, model: str, **extra: object) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"model": model, "messages": HI, **extra})


def test_blocking_and_streaming_pass_through_with_the_public_name_and_usage(
    http: httpx.Client, upstreams: dict[str, Upstream]
) -> None:
    r = chat(http, "solo")
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == "solo" and body["choices"][0]["message"]["content"] == REPLY
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    assert r.headers["x-inhouse-deployment"].startswith(upstreams["a"].url)
    assert upstreams["a"].log()[-1]["model"] == "up-model"  # the upstream's own name for it
    upstreams["a"].script({"chunk_delay": 0.05})  # paced, so each chunk is forwarded as it comes
    streamed = stream(http, "/v1/chat/completions", {"model": "solo", "messages": HI, "stream": True,
                                                     "stream_options": {"include_usage": True}})
    assert streamed.done and streamed.text == REPLY
    assert all(e["model"] == "solo" for e in streamed.events)
    assert len([e for e in streamed.events if e.get("choices") and e["choices"][0]["delta"].get("content")]) == 5
    assert streamed.events[-1]["usage"]["completion_tokens"] == 5


def test_usage_is_counted_when_the_upstream_sends_none(http: httpx.Client, upstreams: dict[str, Upstream]) -> None:
    upstreams["a"].script({"usage": False})
    usage = chat(http, "solo").json()["usage"]
    assert usage["completion_tokens"] == 5 and usage["prompt_tokens"] > 0


def test_retry_then_success(http: httpx.Client, upstreams: dict[str, Upstream]) -> None:
    before = len(upstreams["a"].log())
    upstreams["a"].script({"status": 500}, {"status": 429})
    r = chat(http, "solo")
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == REPLY
    assert len(upstreams["a"].log()) - before == 3


def test_a_4xx_from_the_upstream_is_not_retried(http: httpx.Client, upstreams: dict[str, Upstream]) -> None:
    before = len(upstreams["a"].log())
    upstreams["a"].script({"status": 400})
    assert_error(chat(http, "solo"), 400, "invalid_request")
    assert len(upstreams["a"].log()) - before == 1


def test_stall_before_the_first_token_moves_to_the_other_deployment(
    http: httpx.Client, upstreams: dict[str, Upstream]
) -> None:
    for name in ("b", "c"):
        upstreams[name].script({"delay": 5})
    started = time.monotonic()
    r = chat(http, "pair")
    elapsed = time.monotonic() - started
    upstreams["b"].script()
    upstreams["c"].script()
    # both stall once (1 s first-token timeout each), then the retry gets a prompt answer
    assert r.status_code == 200, r.text
    assert elapsed < 4.5


def test_weighted_balancing_sends_more_to_the_heavier_deployment(
    http: httpx.Client, upstreams: dict[str, Upstream]
) -> None:
    time.sleep(1.6)  # any circuit opened by the stall test has cooled off
    served: Counter[str] = Counter()
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(base_url=str(http.base_url), timeout=30) as client:
            for _ in range(6):
                r = client.post("/v1/chat/completions", json={"model": "pair", "messages": HI, "stream": True})
                with lock:
                    served[r.headers["x-inhouse-deployment"]] += 1

    for name in ("b", "c"):
        upstreams[name].script(*[{"chunk_delay": 0.05}] * 60)
    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    upstreams["b"].script()
    upstreams["c"].script()
    assert served["b"] + served["c"] == 48
    assert served["b"] >= 2 * served["c"], served  # weight 3 : 1, least outstanding per unit of weight


def test_fallback_answers_and_the_circuit_opens_then_closes(
    http: httpx.Client, upstreams: dict[str, Upstream]
) -> None:
    d = upstreams["d"]
    d.script(*[{"status": 503}] * 3)
    r = chat(http, "flaky")
    assert r.status_code == 200
    assert r.json()["model"] == "backup" and r.headers["x-inhouse-deployment"] == "backup"
    assert r.json()["choices"][0]["message"]["content"] == "answer from the backup"
    card = http.get("/v1/models/flaky").json()
    assert card["deployments"][0]["circuit"] == "open" and card["fallbacks"] == ["backup"]
    calls = len(d.log())
    assert chat(http, "flaky").json()["model"] == "backup"
    assert len(d.log()) == calls, "an open circuit keeps requests away from the deployment"
    time.sleep(1.6)  # cooldown: the next request probes d, which works again
    r = chat(http, "flaky")
    assert r.json()["model"] == "flaky" and r.headers["x-inhouse-deployment"] == "d"
    assert http.get("/v1/models/flaky").json()["deployments"][0]["circuit"] == "closed"


def test_health_checks_mark_a_killed_upstream_down_and_back_up(
    http: httpx.Client, upstreams: dict[str, Upstream]
) -> None:
    e = upstreams["e"]

    def healthy() -> bool:
        return bool(http.get("/health").json()["models"]["watched"]["healthy"])

    assert healthy()
    e.stop()
    killed = time.monotonic()
    while healthy():
        assert time.monotonic() - killed < 1.0 + 0.5, "not marked down within 2 health intervals"
        time.sleep(0.05)
    assert "unreachable" in http.get("/health").json()["models"]["watched"]["health_error"]
    assert_error(chat(http, "watched"), 503, "upstream_unavailable")
    e.start()
    restarted = time.monotonic()
    while not healthy():
        assert time.monotonic() - restarted < 1.0 + 0.5, "not marked up within 2 health intervals"
        time.sleep(0.05)
    assert "health_error" not in http.get("/health").json()["models"]["watched"]
    assert chat(http, "watched").status_code == 200


def test_mid_stream_drop_is_one_error_event_then_done(http: httpx.Client, upstreams: dict[str, Upstream]) -> None:
    upstreams["a"].script({"drop_after": 2})
    result = stream(http, "/v1/chat/completions", {"model": "solo", "messages": HI, "stream": True})
    # what arrived before the cut is passed on (a chunk in flight with the reset may be lost with it)
    assert result.done and result.text in ("Hello ", "Hello from ")
    errors = [e for e in result.events if "error" in e]
    assert len(errors) == 1 and errors[0]["error"]["code"] == "upstream_error"
    assert result.finish_reasons == [], "a cut answer must not claim to have finished"
    upstreams["a"].script({"drop_after": 2})
    assert_error(chat(http, "solo"), 502, "upstream_error")


def test_client_disconnect_closes_the_upstream_request(http: httpx.Client, upstreams: dict[str, Upstream]) -> None:
    a = upstreams["a"]
    a.script({"chunk_delay": 0.5})
    with http.stream("POST", "/v1/chat/completions", json={"model": "solo", "messages": HI, "stream": True}) as r:
        lines = r.iter_lines()
        while not next(lines).startswith('data: {"id"'):
            pass
    deadline = time.monotonic() + 3
    while not a.log()[-1]["disconnected"]:
        assert time.monotonic() < deadline, f"the upstream never saw the disconnect: {a.log()[-1]}"
        time.sleep(0.05)
    assert not a.log()[-1]["finished"]


def test_another_inhouse_as_upstream(http: httpx.Client, inner: ServerProcess) -> None:
    body = {"model": "tiny", "messages": HI, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    direct = httpx.post(inner.url + "/v1/chat/completions", json={**body, "model": TINY}, timeout=30).json()
    r = http.post("/v1/chat/completions", json=body).json()
    assert r["model"] == "tiny"
    assert r["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
    assert r["usage"] == direct["usage"]
    streamed = stream(http, "/v1/chat/completions", {**body, "stream": True})
    assert streamed.text == direct["choices"][0]["message"]["content"]


def test_upstream_and_fallback_flags_without_a_file(upstreams: dict[str, Upstream], cache_dir: Path,
                                                    logs_dir: Path) -> None:
    a, b = upstreams["a"], upstreams["b"]
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    args = ["--upstream", f"main={dead}", "--upstream", f"spare=up-model@{b.url}/v1", "--upstream-key",
            "spare=sk-test", "--fallback", "main=spare"]
    with ServerProcess(args, cache_dir, logs_dir / "flags.log") as server:
        names = [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]
        assert names == ["main", "spare"], "only the upstreams: the embedded model is not loaded"
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": "main", "messages": HI}, timeout=30)
        assert r.status_code == 200 and r.json()["model"] == "spare"
    assert a is not None


def test_completion_health_checks_notice_a_model_that_errors(upstreams: dict[str, Upstream], tmp_path: Path,
                                                              cache_dir: Path, logs_dir: Path) -> None:
    """``health_check: completion`` sends a 1-token completion: an upstream whose /models still answers but
    whose model fails (scripted 500s) is marked down, which a /models check would miss."""
    c = upstreams["c"]
    config = tmp_path / "inhouse.yaml"
    config.write_text(f"""
routing: {{health_interval_seconds: 0.3, health_timeout_seconds: 1, health_check: completion}}
models: [{{name: probed, engine: upstream, base_url: "{c.url}/v1", upstream_model: up-model}}]
""", encoding="utf-8")
    with ServerProcess(["--config", str(config)], cache_dir, logs_dir / "probe.log") as server:
        def healthy() -> bool:
            return bool(httpx.get(server.url + "/health").json()["models"]["probed"]["healthy"])

        before = len(c.log())
        time.sleep(1.0)
        probes = c.log()[before:]
        assert probes and all(p["model"] == "up-model" and not p["stream"] for p in probes)
        c.script(*[{"status": 500}] * 20)
        deadline = time.monotonic() + 3
        while healthy():
            assert time.monotonic() < deadline, "a model answering 500 was not marked down"
            time.sleep(0.05)
        c.script()
        deadline = time.monotonic() + 3
        while not healthy():
            assert time.monotonic() < deadline, "not marked up again"
            time.sleep(0.05)
