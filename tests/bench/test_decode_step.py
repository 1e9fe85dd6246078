"""``bench/decode_step.py --smoke`` on the tiny model: the engine's runner over its KV tiers decodes the batch, the
speed table and the exactness lines come out, and float32 greedy tokens equal ``model.generate``'s."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import decode_step


def test_a_smoke_run_times_both_contenders_and_checks_the_tokens(tiny_model_dir: Path, cache_dir: Path,
                                                                 tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "decode_step.json"
    decode_step.main(["--smoke", "--model", str(tiny_model_dir), "--cache-dir", str(cache_dir), "--out", str(out)])
    result = json.loads(out.read_text())
    speed = {(row["contender"], row["batch"]): row for row in result["speed"]}
    assert set(speed) == {(name, b) for name in ("inhouse", "generate") for b in (1, 2)}
    assert all(row["step_ms"] > 0 and row["tokens_per_s"] > 0 for row in speed.values())
    checks = {(row["dtype"], row["contender"]): row for row in result["exactness"]}
    assert checks[("float32", "inhouse")]["first_divergence"] == {}
    assert checks[("float32", "inhouse-alone")]["first_divergence"] == {}
    printed = capsys.readouterr().out
    assert "decode ms/step" in printed and "exactness  float32 inhouse" in printed
