"""Every runnable block of the docs (```` ```bash runnable ````, ```` ```python runnable ````) runs against a real
server and exits 0, printing what its ``expect=`` says.

One server for all blocks, booted through the CLI with keys on: ``smollm2-135m-instruct`` is the fake engine
answering "The capital of France is Paris." (so the blocks run in seconds; the real model's answers are tested
in tests/e2e), ``all-minilm-l6-v2`` the tiny random embedder.  Blocks run in page order, each in a fresh
directory, with ``http://127.0.0.1:8000`` replaced by the server's address and in the environment:
``INHOUSE_URL``, ``INHOUSE_KEY`` (an admin key), ``INHOUSE_ADMIN_KEY``, ``INHOUSE_STATE_DIR`` (the server's
database, for ``inhouse keys ...``) and ``inhouse`` on the PATH (this checkout's CLI).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.docs.markdown import Block, pages, runnable_blocks
from tests.process import ADMIN_KEY, REPO, ServerProcess

DOCS_URL = "http://127.0.0.1:8000"
BLOCKS = [block for page in pages() for block in runnable_blocks(page)]


@pytest.fixture(scope="module")
def docs_server(cache_dir: Path, logs_dir: Path, tiny_embedder_dir: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("docs-server")
    (folder / "inhouse.yaml").write_text(f"""
models:
  - name: smollm2-135m-instruct
    engine: fake
    fake_reply: "The capital of France is Paris."
  - name: all-minilm-l6-v2
    engine: sentence-transformers
    path: {tiny_embedder_dir}
""", encoding="utf-8")
    with ServerProcess(["--config", str(folder / "inhouse.yaml")], cache_dir, logs_dir / "docs.log",
                       auth=True) as server:
        yield server


@pytest.fixture(scope="module")
def block_env(docs_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    bin_dir = tmp_path_factory.mktemp("docs-bin")
    shim = bin_dir / "inhouse"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m inhouse "$@"\n', encoding="utf-8")
    shim.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}"
            f"{os.environ.get('PATH', '')}", "PYTHONPATH": str(REPO), "INHOUSE_URL": docs_server.url,
            "INHOUSE_KEY": ADMIN_KEY, "INHOUSE_ADMIN_KEY": ADMIN_KEY,
            "INHOUSE_STATE_DIR": str(docs_server.state_dir), "INHOUSE_CACHE_DIR": str(docs_server.cache_dir)}


def _command(block: Block, path: Path) -> list[str]:
    if block.language in ("bash", "sh", "shell"):
        return ["bash", "-e", "-o", "pipefail", str(path)]
    if block.language == "python":
        return [sys.executable, str(path)]
    raise AssertionError(f"{block.id}: runnable blocks are bash or python, not {block.language!r}")


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_runnable_block(block: Block, docs_server: ServerProcess, block_env: dict[str, str],
                        tmp_path: Path) -> None:
    script = tmp_path / ("block.py" if block.language == "python" else "block.sh")
    script.write_text(block.code.replace(DOCS_URL, docs_server.url), encoding="utf-8")
    proc = subprocess.run(_command(block, script), cwd=tmp_path, env=block_env, capture_output=True, text=True,
                          timeout=180)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{block.id} exited {proc.returncode}:\n{output[-3000:]}"
    for text in block.expect:
        assert text in output, f"{block.id}: {text!r} not in its output:\n{output[-3000:]}"


def test_the_readmes_and_guides_have_runnable_blocks() -> None:
    by_page = {b.path.relative_to(REPO).as_posix() for b in BLOCKS}
    assert {"README.md", "README.zh-CN.md", "docs/dify.md", "docs/zh-CN/dify.md"} <= by_page
    assert shutil.which("curl"), "the runnable blocks use curl"


def test_blocks_are_read_with_their_expectations(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text('text\n\n```bash runnable expect="Paris" expect=200\ncurl x\n```\n\n```bash\nnot run\n```\n'
                    "```python runnable\nprint(1)\n```\n", encoding="utf-8")
    blocks = runnable_blocks(page)
    assert [(b.line, b.language, b.code, b.expect) for b in blocks] == [
        (3, "bash", "curl x\n", ("Paris", "200")), (10, "python", "print(1)\n", ())]
