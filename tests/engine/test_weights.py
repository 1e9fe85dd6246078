"""Parameter counts and in-memory sizes from checkpoint headers, without loading a tensor."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from inhouse.engine.weights import parameter_count, weights_in_memory


def test_safetensors_headers_count_every_parameter(tiny_model_dir: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        expected = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())  # noqa: SIM118
    assert expected > 0 and parameter_count(tiny_model_dir) == (expected, 0)
    assert weights_in_memory(tiny_model_dir, 2) == 2 * expected


def test_files_without_a_readable_header_count_their_size(tmp_path: Path, tiny_model_dir: Path) -> None:
    copy = tmp_path / "m"
    shutil.copytree(tiny_model_dir, copy)
    (copy / "extra.bin").write_bytes(b"x" * 1000)
    parameters, other = parameter_count(copy)
    assert other == 1000 and weights_in_memory(copy, 4) == parameters * 4 + 1000


def test_a_damaged_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(ValueError, match=r"model\.safetensors cannot be read as safetensors"):
        parameter_count(tmp_path)
