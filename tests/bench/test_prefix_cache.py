"""``bench/prefix_cache.py`` on the tiny model (float32): both arms answer the same, the cache serves the repeated
context, and the table, target line and JSON come out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import prefix_cache


def test_a_short_run_writes_both_arms_and_the_target(tiny_model_dir: Path, cache_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "prefix_cache.json"
    status = prefix_cache.main(["--model", str(tiny_model_dir), "--dtype", "float32", "--rounds", "2",
                                "--tokens", "150", "--cache-dir", str(cache_dir), "--out", str(out)])
    result = json.loads(out.read_text())
    assert status == 0 and result["same_answers"] is True and result["rounds"] == 2
    assert result["context_tokens"] >= 150 and result["meta"]["smoke"] is False
    assert set(result["later_ttft_p50_s"]) == {"on", "off"} and all(v > 0 for v in result["first_ttft_p50_s"].values())
    assert result["prefix_cache_hit_tokens"] > 0  # the later questions reused the context
    [target] = result["targets"]
    assert target["bound"] == 0.3 and target["value"] == pytest.approx(result["later_ratio_on_over_off"])
    printed = capsys.readouterr().out
    assert "prefix cache  first TTFT p50  later TTFT p50" in printed and "later-question TTFT" in printed


def test_each_round_has_its_own_context_of_at_least_the_tokens_asked() -> None:
    words = lambda text: {"input_ids": text.split()}  # noqa: E731
    first, second = prefix_cache.context(0, 200, words), prefix_cache.context(1, 200, words)
    assert first != second and len(first.split()) >= 200 and first.startswith(prefix_cache.SYSTEM)
