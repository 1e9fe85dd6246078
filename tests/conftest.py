"""Session fixtures: the tiny model, the real SmolLM2, and real servers booted through the CLI."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.process import REPO, ServerProcess
from tests.tiny_model import build_tiny_llama

TINY = "tiny-llama"
SMOL = "smollm2-135m-instruct"


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
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir: Path, cache_dir: Path, logs_dir: Path) -> Iterator[ServerProcess]:
    """The tiny model in fp32, served by the real CLI."""
    args = ["--model", str(tiny_model_dir), "--name", TINY, "--dtype", "float32", "--max-num-seqs", "8",
            "--max-waiting", "16", "--keepalive", "0.5"]
    with ServerProcess(args, cache_dir, logs_dir / "tiny.log") as server:
        yield server


@pytest.fixture(scope="session")
def smol_server(cache_dir: Path, logs_dir: Path) -> Iterator[ServerProcess]:
    """The embedded default (SmolLM2-135M-Instruct, bf16 on this CPU), served by the real CLI."""
    with ServerProcess([], cache_dir, logs_dir / "smol.log", ready_timeout=600) as server:
        yield server
