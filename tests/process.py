"""Boots the real ``inhouse serve`` CLI as a subprocess on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
ADMIN_KEY = "ih-test-admin-0123456789abcdefghijklmnop"  # the bootstrap admin of every test server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``with ServerProcess([...args]) as server:`` → ``server.url`` answers once every model is ready."""

    def __init__(self, args: list[str], cache_dir: Path, log_path: Path, ready_timeout: float = 180.0,
                 env: dict[str, str] | None = None, python: str = sys.executable, auth: bool = False,
                 state_dir: Path | None = None, cwd: Path = REPO, tls: ssl.SSLContext | None = None) -> None:
        """``auth`` False runs the server with ``--auth none`` (tests of other features); True needs keys,
        with ``ADMIN_KEY`` as the bootstrap admin.  State (SQLite, audit log) goes to ``state_dir``, by default
        a fresh directory beside the log.  ``cwd`` is the checkout whose ``inhouse`` runs (benchmarks compare
        another revision).  ``tls``: the server serves HTTPS (its args say how) and this context (trusting its
        CA, with a client certificate when it asks for one) checks it is ready."""
        self.python = python
        self.auth = auth
        self.state_dir = state_dir or Path(tempfile.mkdtemp(prefix="state-", dir=log_path.parent))
        self.port = free_port()
        self.args = args
        self.cache_dir = cache_dir
        self.log_path = log_path
        self.ready_timeout = ready_timeout
        self.env = env or {}
        self.cwd = cwd
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True) -> ServerProcess:
        env = {**os.environ, "INHOUSE_CACHE_DIR": str(self.cache_dir), "INHOUSE_STATE_DIR": str(self.state_dir),
               "INHOUSE_ADMIN_KEY": ADMIN_KEY, "PYTHONUNBUFFERED": "1", **self.env}
        auth = [] if self.auth or "--auth" in self.args else ["--auth", "none"]
        cmd = [self.python, "-m", "inhouse", "serve", "--port", str(self.port), *auth, *self.args]
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.cwd)
        if wait_ready:
            try:
                self.wait_ready()
            except BaseException:  # never leave a server (and its log file) behind a failed start
                self.stop()
                raise
        return self

    def wait_ready(self) -> None:
        """Until ``/ready`` answers 200: every model loaded.  A model that failed to load fails this at once."""
        def ready() -> bool:
            if self._get("/ready").status_code == 200:
                return True
            failed = {name: m.get("error") for name, m in self._get("/health").json()[
                "models"].items() if m["state"] == "failed"}
            if failed:
                raise RuntimeError(f"models failed to load: {failed}; log: {self.log_path}\n{self.log()}")
            return False

        self._wait_until(ready, "not ready")

    def wait_settled(self) -> None:
        """Until no model is still loading (for servers where some models are expected to fail)."""
        def settled() -> bool:
            models = self._get("/health").json()["models"]
            return all(m["state"] != "loading" for m in models.values())

        self._wait_until(settled, "models still loading")

    def _get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=2, verify=self.tls or True)

    def _wait_until(self, condition: Callable[[], bool], failure: str) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log: {self.log_path}\n{self.log()}")
            try:
                if condition():
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{failure} after {self.ready_timeout}s; log: {self.log_path}\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if hasattr(self, "_log"):
            self._log.close()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
