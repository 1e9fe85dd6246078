"""``bench/chunked_prefill.py`` on the tiny model (float32): a stream decodes while a long prompt arrives, with
chunks and without; both arms answer the same and the JSON holds each arm's gap and TTFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import chunked_prefill


def test_a_short_run_writes_both_arms(tiny_model_dir: Path, cache_dir: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "chunked_prefill.json"
    status = chunked_prefill.main(["--model", str(tiny_model_dir), "--dtype", "float32", "--chunk", "32",
                                   "--tokens", "150", "--stream-tokens", "24", "--cache-dir", str(cache_dir),
                                   "--out", str(out)])
    result = json.loads(out.read_text())
    assert status == 0 and result["same_answers"] is True
    assert set(result["arms"]) == {"0", "32"}
    for arm in result["arms"].values():
        assert arm["longest_gap_s"] > 0 and arm["long_ttft_s"] > 0
    assert "prefill_chunk_tokens  stream: longest gap  long prompt TTFT" in capsys.readouterr().out


def test_the_long_prompt_has_at_least_the_tokens_asked() -> None:
    words = lambda text: {"input_ids": text.split()}  # noqa: E731
    assert len(chunked_prefill.long_text(100, words).split()) >= 100
