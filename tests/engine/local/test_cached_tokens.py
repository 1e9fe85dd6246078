"""The local engine's ``usage.cached_tokens``: the prompt tokens its prefix cache supplied when the sequence was
placed, in whole blocks; not the tokens chunked prefill computed after them; 0 when the cache is off."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from inhouse.engine.base import GenerateRequest, SamplingParams, Usage
from inhouse.engine.local.engine import LocalEngine
from inhouse.engine.local.prefix_cache import BLOCK
from tests.engine.local.test_chunked_prefill import ids, start

CHUNK = 32  # smaller than a block: a prompt continuing a cached prefix is still prefilled in several chunks


@pytest.fixture(scope="module")
async def chunked(tiny_model_dir: Path, cache_dir: Path) -> AsyncIterator[LocalEngine]:
    engine = await start(tiny_model_dir, cache_dir, prefill_chunk_tokens=CHUNK)
    yield engine
    await engine.close()


@pytest.fixture(scope="module")
async def uncached(tiny_model_dir: Path, cache_dir: Path) -> AsyncIterator[LocalEngine]:
    engine = await start(tiny_model_dir, cache_dir, prefix_cache=False)
    yield engine
    await engine.close()


async def usage(engine: LocalEngine, name: str, prompt: list[int]) -> Usage:
    sampling = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    [generation] = await engine.submit([GenerateRequest(name, sampling, prompt=tuple(prompt))])
    deltas = [delta async for delta in generation]
    assert deltas[-1].usage is not None
    return deltas[-1].usage


async def test_the_prefix_hit_is_counted_at_placement_not_advanced_by_chunks(chunked: LocalEngine) -> None:
    context = ids(5 * BLOCK + 11, seed=11)
    first = await usage(chunked, "a", context)
    hits = chunked.stats().prefix_cache_hit_tokens
    again = await usage(chunked, "b", [*context, *ids(3 * CHUNK + 5, seed=12)])  # the rest takes 4 chunks
    assert first == Usage(5 * BLOCK + 11, 4, 0)
    assert again == Usage(5 * BLOCK + 11 + 3 * CHUNK + 5, 4, 5 * BLOCK)
    assert chunked.stats().prefix_cache_hit_tokens - hits == again.cached_tokens  # the same count as /metrics
    short = await usage(chunked, "c", ids(BLOCK, seed=13))  # its last token is never cached: no whole block
    assert (await usage(chunked, "d", ids(BLOCK, seed=13))).cached_tokens == short.cached_tokens == 0


async def test_without_a_prefix_cache_nothing_is_cached(uncached: LocalEngine) -> None:
    context = ids(3 * BLOCK + 1, seed=14)
    assert [(await usage(uncached, name, context)).cached_tokens for name in "ab"] == [0, 0]
