"""``bench/linear_layers.py --smoke``: both ways are timed at each row count, the table comes out, and the JSON holds
a ratio per row count (on a CPU where the linear kernel runs; elsewhere it says why and exits with status 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import linear_layers
from inhouse.engine.local.linear_kernel import LinearKernel


def test_a_smoke_run_times_both_ways(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "linear_layers.json"
    status = linear_layers.main(["--smoke", "--out", str(out)])
    kernel, why = LinearKernel.load()
    if kernel is None:
        assert status == 1 and why in capsys.readouterr().out
        return
    assert status == 0
    results = json.loads(out.read_text())["results"]
    assert [r["rows"] for r in results] == [1, 8]
    assert all(r["layer_onednn_s"] > 0 and r["layer_kernel_s"] > 0 and r["layer_ratio"] > 0 for r in results)
    assert set(results[0]["shapes"]) == {name for name, *_ in linear_layers.SHAPES}
    assert "kernel/oneDNN" in capsys.readouterr().out
