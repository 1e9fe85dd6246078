"""VllmEngine's usage: vLLM's ``num_cached_tokens`` becomes ``Usage.cached_tokens``, 0 when vLLM says none, never
more than the prompt (the engine's own count is checked end to end in tests/e2e/test_vllm.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from inhouse.engine.base import Usage
from inhouse.engine.vllm import _usage


@pytest.mark.parametrize(("reported", "cached"), [(128, 128), (0, 0), (None, 0), (-3, 0), (999, 200), (True, 0)])
def test_vllms_cached_count_within_the_prompt(reported: object, cached: int) -> None:
    assert _usage(SimpleNamespace(num_cached_tokens=reported), 200, 5) == Usage(200, 5, cached)


def test_an_output_without_the_field_counts_zero() -> None:
    assert _usage(SimpleNamespace(), 10, 1) == Usage(10, 1, 0)
