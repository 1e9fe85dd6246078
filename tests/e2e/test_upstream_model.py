"""The upstream's own model id, through the real CLI (issue 9, defects 2 and 3).

``--upstream NAME=ID@URL`` and ``--upstream NAME=URL --upstream-model NAME=ID`` send ID to the upstream (a
fault upstream, tests/fault_upstream.py, which serves "up-model"); a deployment whose upstream does not list
the id it asks for is marked down by the default health check, with the reason in ``/health``; and the
start-up line names the upstream's URL and id.  The flag parsing (ids with ``/``, ``:``) is checked in-process.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from inhouse.cli import serve
from inhouse.config import ConfigError
from tests.e2e.helpers import assert_error
from tests.e2e.test_gateway import Upstream
from tests.process import ServerProcess

HI = [{"role": "user", "content": "hi"}]
INTERVAL = 0.5  # health_interval_seconds of the server under test


@pytest.fixture(scope="module")
def upstreams(logs_dir: Path) -> Iterator[dict[str, Upstream]]:
    ups = {name: Upstream(name, logs_dir).start() for name in ("short", "long", "wrong")}
    yield ups
    for up in ups.values():
        up.stop()


@pytest.fixture(scope="module")
def server(upstreams: dict[str, Upstream], tmp_path_factory: pytest.TempPathFactory, cache_dir: Path,
           logs_dir: Path) -> Iterator[ServerProcess]:
    """``short`` and ``long`` name the upstream's model with each flag form; ``wrong`` names one it lacks."""
    config = tmp_path_factory.mktemp("upstream-model") / "inhouse.yaml"
    config.write_text(f"""
routing: {{health_interval_seconds: {INTERVAL}, health_timeout_seconds: 0.5, retries: 0}}
models: [{{name: local, engine: fake}}]
""", encoding="utf-8")
    short, long, wrong = (upstreams[n].url + "/v1" for n in ("short", "long", "wrong"))
    args = ["--config", str(config), "--upstream", f"short=up-model@{short}", "--upstream", f"long={long}",
            "--upstream-model", "long=up-model", "--upstream", f"wrong=qwen/Qwen2.5-7B@{wrong}"]
    with ServerProcess(args, cache_dir, logs_dir / "upstream-model.log") as proc:
        yield proc


def deployment(server: ServerProcess, name: str) -> dict:  # type: ignore[type-arg]
    return httpx.get(server.url + "/health", timeout=5).json()["models"][name]  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", ["short", "long"])
def test_both_flag_forms_send_the_upstreams_model_id(server: ServerProcess, upstreams: dict[str, Upstream],
                                                     name: str) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": name, "messages": HI}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == name, "clients see the public name"
    assert upstreams[name].log()[-1]["model"] == "up-model"
    time.sleep(2 * INTERVAL + 0.2)  # health checks ran: the id is listed, so the deployment stays up
    assert deployment(server, name)["healthy"] and "health_error" not in deployment(server, name)


def test_a_model_id_the_upstream_does_not_list_is_down_with_the_reason(server: ServerProcess) -> None:
    started = time.monotonic()
    while deployment(server, "wrong")["healthy"]:
        assert time.monotonic() - started < 2 * INTERVAL + 1.0, "not marked down within a couple of intervals"
        time.sleep(0.05)
    entry = deployment(server, "wrong")
    assert entry["health_error"] == "the upstream does not serve model 'qwen/Qwen2.5-7B'; it lists: up-model"
    assert entry["deployments"][0]["health_error"] == entry["health_error"]
    assert httpx.get(server.url + "/ready", timeout=5).status_code == 200, "loaded, only unhealthy"
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "wrong", "messages": HI}, timeout=30)
    assert_error(r, 503, "upstream_unavailable")


def test_the_start_up_line_names_the_upstream_and_its_model_id(server: ServerProcess,
                                                                upstreams: dict[str, Upstream]) -> None:
    log = server.log_path.read_text(errors="replace")
    assert f"serving short from {upstreams['short'].url}/v1 as model 'up-model' (engine upstream)" in log
    assert f"serving long from {upstreams['long'].url}/v1 as model 'up-model' (engine upstream)" in log
    assert "from  (engine" not in log


def _flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.add_parser(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_model_ids_may_hold_slashes_colons_and_at_signs() -> None:
    settings = serve.build_settings(_flags(
        "--upstream", "q=qwen/Qwen2.5-7B@http://vllm:8000/v1", "--upstream", "o=llama3:8b@https://ollama:11434/v1",
        "--upstream", "odd=team@org/model@http://h:1/v1", "--upstream", "plain=http://h:2/v1",
        "--upstream", "named=http://h:3/v1", "--upstream-model", "named=meta-llama/Llama-3.1-8B"))
    specs = {m.name: (m.upstream_model, m.base_url) for m in settings.models}
    assert specs == {"q": ("qwen/Qwen2.5-7B", "http://vllm:8000/v1"), "o": ("llama3:8b", "https://ollama:11434/v1"),
                     "odd": ("team@org/model", "http://h:1/v1"), "plain": (None, "http://h:2/v1"),
                     "named": ("meta-llama/Llama-3.1-8B", "http://h:3/v1")}


@pytest.mark.parametrize(("argv", "message"), [
    (["--upstream", "a=@http://h/v1"], "the model id before '@' is empty"),
    (["--upstream", "a=x@http://h/v1", "--upstream-model", "a=y"], "names model 'x' but --upstream-model says 'y'"),
    (["--upstream-model", "ghost=x", "--upstream", "a=http://h/v1"], "there is no --upstream ghost"),
])
def test_contradicting_or_dangling_model_ids_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        serve.build_settings(_flags(*argv))
