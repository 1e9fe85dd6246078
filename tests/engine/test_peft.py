"""PEFT adapter files, whichever engine serves them: the rank a config declares, the linear modules of a base
(a LoRA wrapper counts as the linear it wraps), and refusals naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from inhouse.engine.peft import AdapterError, adapter_rank, linear_shapes


def test_the_rank_is_the_largest_of_r_and_rank_pattern(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "rank_pattern": {"q_proj": 32, "v_proj": 4}}))
    assert adapter_rank(tmp_path) == 32
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4}))
    assert adapter_rank(tmp_path) == 4


def test_an_unreadable_config_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match=str(tmp_path / "adapter_config.json")):
        adapter_rank(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="cannot read"):
        adapter_rank(tmp_path)


class _Wrapper(torch.nn.Module):
    def __init__(self, base: torch.nn.Module) -> None:
        super().__init__()
        self.base = base


def test_linear_shapes_see_through_a_wrapper() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), _Wrapper(torch.nn.Linear(6, 2)), torch.nn.ReLU())
    shapes = linear_shapes(model)
    assert shapes["0"] == (4, 6) and shapes["1"] == (6, 2) and "2" not in shapes
