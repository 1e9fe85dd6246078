"""``inhouse doctor``'s machine and service checks: each one's verdict, detail and fix, without a real outage."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from inhouse.cli.checks import (
    Check,
    check_database,
    check_port,
    check_python,
    check_redis,
    check_torch,
    check_vllm,
    with_deadline,
)
from inhouse.config import Settings, load_settings
from tests.process import free_port


def _settings(tmp_path: Path, **fields: object) -> Settings:
    """Settings with a fake model (or ``models``), state in ``tmp_path``."""
    models = fields.pop("models", [{"name": "f", "engine": "fake"}])
    return load_settings(None, {"state_dir": tmp_path, "models": models, **fields}, base_dir=tmp_path)


def test_python_is_new_enough() -> None:
    check = check_python()
    assert check.status == "ok" and "Python 3." in check.detail and check.fix is None


def test_port_in_use_fails_with_the_fix(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        check = check_port(_settings(tmp_path, port=port))
    assert check.status == "fail" and f"127.0.0.1:{port}" in check.detail
    assert check.fix is not None and "port" in check.fix
    assert check_port(_settings(tmp_path, port=free_port())).status == "ok"
    assert check_port(_settings(tmp_path, port=0)).status == "ok"


def test_redis_not_configured_is_fine(tmp_path: Path) -> None:
    assert check_redis(_settings(tmp_path)).status == "ok"


def test_redis_bad_scheme_names_the_key(tmp_path: Path) -> None:
    check = check_redis(_settings(tmp_path, redis_url="http://localhost:6379"))
    assert check.status == "fail" and "redis_url" in check.detail
    assert check.fix is not None and "redis://" in check.fix


def test_redis_unreachable_fails_and_hides_the_password(tmp_path: Path) -> None:
    check = check_redis(_settings(tmp_path, redis_url=f"redis://user:s3cret@127.0.0.1:{free_port()}/0"))
    assert check.status == "fail" and "s3cret" not in check.detail and "***" in check.detail
    assert check.fix is not None and check.fix.startswith("start Redis")


def test_database_sqlite_answers_and_a_closed_postgres_fails(tmp_path: Path) -> None:
    ok = check_database(_settings(tmp_path))
    assert ok.status == "ok" and "sqlite" in ok.detail
    down = check_database(_settings(tmp_path, database_url=f"postgresql://u:pw@127.0.0.1:{free_port()}/db"))
    assert down.status == "fail" and "pw" not in down.detail.replace("***", "")
    assert down.fix is not None and "database_url" in down.fix
    bad = check_database(_settings(tmp_path, database_url="mysql://x/y"))
    assert bad.status == "fail" and "only sqlite and postgresql" in bad.detail


def test_a_hung_probe_fails_at_its_deadline() -> None:
    def hangs() -> Check:
        time.sleep(30)
        return Check("slow", "ok", "never")

    start = time.monotonic()
    check = with_deadline("slow", 0.2, hangs)
    assert check.status == "fail" and "no answer within 0.2 s" in check.detail
    assert time.monotonic() - start < 25  # it did not wait for the probe


def test_a_probe_that_raises_is_a_failure() -> None:
    def boom() -> Check:
        raise RuntimeError("kaput")

    assert with_deadline("x", 5, boom) == Check("x", "fail", "RuntimeError: kaput")


def test_cuda_model_without_cuda_fails(tmp_path: Path) -> None:
    settings = _settings(tmp_path, models=[{"name": "g", "path": str(tmp_path), "engine": "transformers",
                                            "device": "cuda"}])
    check = check_torch(settings, cuda=False)
    assert check.status == "fail" and "g" in check.detail and check.fix is not None and "device" in check.fix
    assert check_torch(_settings(tmp_path), cuda=False).status == "ok"


def test_vllm_engine_without_vllm_fails_and_points_at_a_vllm_venv(tmp_path: Path) -> None:
    settings = _settings(tmp_path, models=[{"name": "v", "path": str(tmp_path), "engine": "vllm"}])
    check = check_vllm(settings, installed=False)
    assert check.status == "fail" and "engine vllm" in check.detail
    assert check.fix is not None and "engine" in check.fix and "vllm_venv.sh" in check.fix
    venv = tmp_path / ".venv-vllm" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text("")
    there = check_vllm(settings, (tmp_path,), installed=False)
    assert there.fix is not None and str(venv / "python") in there.fix
    assert check_vllm(settings, installed=True).status == "ok"
    auto = _settings(tmp_path, models=[{"name": "a", "path": str(tmp_path)}])
    assert check_vllm(auto, installed=False).status == "ok"
