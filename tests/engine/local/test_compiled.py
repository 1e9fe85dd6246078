"""How the engine's C files are built (``inhouse.engine.local.compiled``): once per user and machine, into a folder
no other user can write, and reused; a folder others can write is passed over.  Needs a C compiler (``cc``), as
the kernels do."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from inhouse.engine.local import compiled

SOURCE = Path(compiled.__file__).with_name("linear_kernel.c")


def test_it_is_built_once_into_a_private_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(compiled.tempfile, "tempdir", str(tmp_path))
    first = compiled.build(SOURCE, "linear", "cc")
    assert first.parent == tmp_path / f"inhouse-kernels-{os.getuid()}" and first.name.startswith("linear-")
    assert stat.S_IMODE(first.parent.stat().st_mode) == 0o700
    built_at = first.stat().st_mtime_ns
    assert compiled.build(SOURCE, "linear", "cc") == first and first.stat().st_mtime_ns == built_at  # reused


def test_a_folder_others_can_write_is_not_used(tmp_path: Path) -> None:
    shared = tmp_path / f"inhouse-kernels-{os.getuid()}"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    chosen = compiled.own_folder(shared)
    assert chosen != shared and stat.S_IMODE(chosen.stat().st_mode) == 0o700
