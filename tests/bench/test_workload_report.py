"""``bench/workload_report.py``: the columns of each workload's table, the targets and the RSS bound."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from bench import engine
from bench.common import load
from bench.workload_cases import Phase
from bench.workload_report import render, rss_bound, targets


def phase(variant: str, ttft: float, **extra: float | None) -> Phase:
    level = load.Level(concurrency=1, requests=2, wall_s=2.0, output_tokens=20, tok_s=10.0, ttft_p50_s=ttft,
                       ttft_p99_s=ttft, itl_p50_s=0.01, tokens_per_request=10.0, tokens_from="usage",
                       others_cores=0.25, itl_p99_s=0.02)
    return Phase(variant, level, jobs=2, jobs_per_s=1.0, peak_rss=1 << 30, prefix_hit=0.5, extra=dict(extra))


@pytest.fixture()
def model(tmp_path: Path) -> Path:
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]},
                         "__metadata__": {}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    return tmp_path


def test_rss_bound_is_kv_space_plus_bf16_weights_plus_a_gib(model: Path) -> None:
    kv = int(engine.VLLM_ENV["VLLM_CPU_KVCACHE_SPACE"]) << 30
    assert rss_bound(model) == kv + 2 * 1_000_000 + (1 << 30)


def test_tables_keep_their_columns() -> None:
    table = engine.contenders(128, 4096, "python")
    results = {"inhouse": {"cold": {"run": phase("2000 tokens x 1", 0.5)},
                           "knowledge": {"run": phase("300 tokens, 2 questions", 0.2, first_ttft_p50_s=0.4,
                                                      later_ttft_p50_s=0.1, later_over_first=0.25)},
                           "mixed": {"closed": phase("2 streams, long one by one", 0.1, long_ttft_p50_s=1.5)}}}
    text = render(table, results, ["cold", "knowledge", "mixed"], {}, {})
    lines = text.splitlines()
    assert lines[1].split() == ["contender", "prompt", "TTFT", "p50", "peak", "RSS", "prefix", "hit", "errors",
                                "others"]
    assert "first TTFT  later TTFT p50  later/first" in text and "0.25x" in text
    assert "ITL p99  long TTFT p50  peak RSS  prefix hit  errors  others" in text
    assert "1.00 GiB" in text and "50%" in text and "0.25" in text


def test_targets_are_not_applicable_without_their_contenders(model: Path) -> None:
    checks = targets({"inhouse": {"rag": {"closed": phase("closed c=2", 0.2)}}}, model)
    by_target = {c.target: c.result for c in checks}
    assert by_target["rag closed: inhouse tok/s >= 1.0x vllm"] == "N/A"
    assert [r for t, r in by_target.items() if t.startswith("rag: inhouse peak RSS")] == ["PASS"]
