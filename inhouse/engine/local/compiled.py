"""The engine's C files, compiled on this machine: building each once, where no other user can replace it.

Owns ``load`` and ``build``: a C source beside the engine's modules (``attention_kernel.c``,
``linear_kernel.c``) is compiled with the machine's C compiler the first time a model loads, into a directory of
this user's (mode 0700, under the system's temporary directory), named by the source's, the compiler's and the
flags' hash; later loads reuse the file.  Nothing is downloaded and no build step is needed at install time.
``load`` says why a library cannot run here (not Linux on x86-64, no AVX512-BF16, no C compiler, a failed build);
the kernels' own modules add what else decides whether they run.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from inhouse.engine.cpu import cpu_has

__all__ = ["AVX512_BF16_FLAGS", "build", "load", "own_folder"]

log = logging.getLogger(__name__)

# what both kernels are compiled with: AVX512-BF16 instructions, and OpenMP, which binds to PyTorch's libgomp
AVX512_BF16_FLAGS = ("-O3", "-std=gnu11", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fPIC",
                     "-shared", "-fopenmp")


def load(source: Path, name: str, compiler: str | None = None) -> tuple[ctypes.CDLL | None, str]:
    """The library of ``source``, built if needed (by ``compiler``, default ``cc``) and loaded, or None and why it
    cannot run here."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None, f"not on {platform.system()} {platform.machine()}"
    if not cpu_has("avx512_bf16"):
        return None, "the CPU has no AVX512-BF16"
    compiler = compiler or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler (cc) to build it"
    try:
        return ctypes.CDLL(str(build(source, name, compiler))), "built"
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"its build failed ({type(exc).__name__})"


def build(source: Path, name: str, compiler: str, flags: tuple[str, ...] = AVX512_BF16_FLAGS) -> Path:
    """The shared library of ``source`` compiled by ``compiler`` with ``flags``, built once per user and machine
    (``OSError`` or ``subprocess.SubprocessError`` when the build fails)."""
    text = source.read_bytes()
    digest = hashlib.sha256(text + " ".join((compiler, *flags)).encode()).hexdigest()[:16]
    folder = own_folder(Path(tempfile.gettempdir()) / f"inhouse-kernels-{os.getuid()}")
    built = folder / f"{name}-{digest}.so"
    if built.exists():
        return built
    partial = folder / f".{name}-{digest}-{os.getpid()}.so"
    subprocess.run([compiler, *flags, "-o", str(partial), str(source)], check=True, capture_output=True, timeout=120)
    os.replace(partial, built)  # atomic: a concurrent build of the same source writes the same bytes
    log.info("built the %s kernels: %s", name, built)
    return built


def own_folder(folder: Path) -> Path:
    """``folder``, made if missing, when it is this user's alone; otherwise a fresh private one (a shared temporary
    directory must not let another user plant the library this process loads)."""
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.lstat()
        if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o077:
            return folder
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="inhouse-kernels-"))
