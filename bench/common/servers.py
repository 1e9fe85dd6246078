"""Starting what a benchmark measures, each on a free loopback port, and stopping it afterwards.

Owns two launchers with one result, ``Running`` (its URL, pid and log file):

- ``inhouse(...)``: ``python -m inhouse serve`` through ``tests/process.py``'s ``ServerProcess``, the launcher
  the end-to-end tests use, with a fresh state directory (SQLite, audit log) beside its log.  ``auth="none"``
  (the default) passes ``--auth none``: since ``auth: keys`` became the server's default, a benchmark that
  forgets this gets ``401 no API key`` on its first request.  ``auth="keys"`` bootstraps ``ADMIN_KEY`` as
  the admin; ``create_key`` then makes a key for the load.  ``inhouse_config`` writes a YAML file (for
  ``audit.enabled: false`` and per-model settings, which have no flags).
- ``peer(...)``: any other server as a plain subprocess in its own session, ready once ``ready_path``
  answers 200, stopped by signalling its whole process group (SIGINT, then SIGTERM, then SIGKILL).

Both wait for readiness, raise ``RuntimeError`` with the log's tail when the server dies or never gets
ready, and always stop it.  It must not know a benchmark's contenders or measure anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from tests.process import ADMIN_KEY, ServerProcess, free_port  # the e2e tests' launcher

ROOT = Path(__file__).resolve().parents[2]

__all__ = ["ADMIN_KEY", "NO_AUTH", "ROOT", "Running", "create_key", "free_port", "inhouse", "inhouse_config",
           "log_dir", "offline_env", "peer", "stop_on_signals"]

# Said in the table header and the JSON meta of every benchmark whose inhouse runs without keys and audit.
NO_AUTH = ("inhouse runs with --auth none and audit.enabled: false (no keys, no limits, no audit log); "
           "bench/access.py measures what they cost")


@dataclass(frozen=True)
class Running:
    """A started server: where it answers, its process id (the root of its process tree) and its log."""

    url: str
    pid: int
    log_path: Path
    command: str

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""


def stop_on_signals() -> None:
    """Make SIGINT and SIGTERM raise ``KeyboardInterrupt``, so the ``finally`` that stops the servers runs (a run
    started in the background ignores SIGINT unless told otherwise)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def log_dir(name: str) -> Path:
    """A fresh temporary directory for one run's server logs and state."""
    return Path(tempfile.mkdtemp(prefix=f"inhouse-bench-{name}-"))


def offline_env(cache_dir: Path | None = None) -> dict[str, str]:
    """Environment for servers that load models: no hub, no tokenizer threads, unbuffered logs."""
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    if cache_dir is not None:
        env["INHOUSE_CACHE_DIR"] = str(cache_dir.resolve())
    return env


def inhouse_config(path: Path, **settings: Any) -> Path:
    """Write ``settings`` as an inhouse config file (JSON is YAML) and return its path."""
    path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    return path


@contextlib.contextmanager
def inhouse(args: list[str], log_path: Path, *, auth: Literal["none", "keys"] = "none",
            cache_dir: Path = ROOT / ".cache", python: str = sys.executable, cwd: Path = ROOT,
            env: dict[str, str] | None = None, ready_timeout: float = 300.0) -> Iterator[Running]:
    """``inhouse serve ARGS`` on a free port until the block ends; ready when ``/ready`` answers 200."""
    server = ServerProcess(args, cache_dir, log_path, ready_timeout=ready_timeout, env=env, python=python,
                           auth=auth == "keys", state_dir=log_path.with_name(f"{log_path.stem}-state"), cwd=cwd)
    server.state_dir.mkdir(parents=True, exist_ok=True)
    flags = " ".join(["--auth", "none", *args] if auth == "none" and "--auth" not in args else args)
    try:
        server.start(wait_ready=False)
        assert server.proc is not None
        server.wait_ready()
        yield Running(server.url, server.proc.pid, log_path, f"{python} -m inhouse serve --port {server.port} {flags}")
    finally:
        server.stop()
        print(f"[{log_path.stem}] stopped", flush=True)


def create_key(server: Running, name: str = "bench", rpm: int = 10**8, tpm: int = 2**31 - 1) -> str:
    """The secret of a new API key with these limits (at most 2**31 - 1) on a server started with auth="keys"."""
    response = httpx.post(server.url + "/admin/keys", json={"name": name, "rpm": rpm, "tpm": tpm},
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
    if not response.is_success:
        raise RuntimeError(f"creating a key failed: HTTP {response.status_code} {response.text[:300]}")
    return str(response.json()["secret"])


@contextlib.contextmanager
def peer(argv: Callable[[int], list[str]], log_path: Path, *, ready_path: str | None = "/ready",
         env: dict[str, str] | None = None, ready_timeout: float = 300.0, cwd: Path = ROOT) -> Iterator[Running]:
    """``argv(port)`` in its own session until the block ends.

    Ready when ``ready_path`` answers 200; with ``ready_path=None``, as soon as the port answers HTTP at all.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = argv(port)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                cwd=cwd, start_new_session=True)
    running = Running(url, proc.pid, log_path, " ".join(command))
    try:
        _wait_ready(proc, running, ready_path, ready_timeout)
        yield running
    finally:
        print(f"[{log_path.stem}] {_stop(proc)}", flush=True)


def _wait_ready(proc: subprocess.Popen[bytes], running: Running, ready_path: str | None, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode} before ready; log tail:\n{running.log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            status = httpx.get(running.url + (ready_path or "/"), timeout=2.0).status_code
            if status == 200 or ready_path is None:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"not ready after {timeout_s:.0f}s; log tail:\n{running.log_tail()}")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen[bytes]) -> str:
    """Signal the server's process group until it exits; say which signal it took.

    SIGINT first (uvicorn's graceful stop); ``transformers serve`` with a live CB thread can outlive it.
    """
    if proc.poll() is not None:
        return f"had already exited with code {proc.returncode}"
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10.0)
            return f"stopped by {sig.name}"
    return "did not stop, even after SIGKILL"
