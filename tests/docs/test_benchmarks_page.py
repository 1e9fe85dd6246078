"""docs/benchmarks.md and its zh-CN twin quote the committed benchmark results, not numbers typed from memory."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.process import REPO

RESULTS = REPO / "bench" / "results"
PAGES = [REPO / "docs" / "benchmarks.md", REPO / "docs" / "zh-CN" / "benchmarks.md"]


def _load(name: str) -> Any:
    return json.loads((RESULTS / name).read_text(encoding="utf-8"))


def _quoted() -> list[str]:
    """Figures both pages must contain, formatted as the pages print them, read from bench/results/*.json."""
    figures = []
    for run, contenders in (("engine.json", ("inhouse", "naive", "tserve", "raw")),
                            ("engine-vllm-run2.json", ("inhouse-vllm", "vllm"))):
        data = _load(run)["contenders"]
        for name in contenders:
            for level in data[name]["levels"].values():
                figures.append(f"{level['tok_s']:.1f}")
    gateway = [r for r in _load("gateway.json")["rows"]
               if r["concurrency"] == 1 and (not r["stream"] or r["target"].startswith("inhouse"))]
    for row in gateway:
        figures.append(f"{row['p50_ms']:.2f} / {row['p99_ms']:.2f}")
    lora = _load("lora.json")["arms"]
    figures += [f"{lora[arm]['tok_s']:.1f}" for arm in ("base", "one", "mixed", "merged")]
    access = _load("access.json")
    figures.append(f"{access['loads']['c=1 blocking']['added_p50_ms']:.2f}")
    figures.append(f"{access['audit_writer']['rows_per_s']:,.0f}")
    return figures


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_page_quotes_the_committed_results(page: Any) -> None:
    text = page.read_text(encoding="utf-8")
    missing = [figure for figure in _quoted() if figure not in text]
    assert missing == [], f"{page.name} does not show these measured figures (bench/results changed?): {missing}"


def test_english_page_quotes_decode_step_and_every_gateway_row() -> None:
    text = PAGES[0].read_text(encoding="utf-8")
    for row in _load("decode_step.json")["speed"]:
        assert f"{row['tokens_per_s']:.1f}" in text
    for row in _load("gateway.json")["rows"]:
        if row["concurrency"] == 16 and row["cpu_ms_per_req"] is not None and not row["stream"]:
            assert f"{row['cpu_ms_per_req']:.2f} ms" in text
