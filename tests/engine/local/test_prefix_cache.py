"""The prefix cache: the same greedy tokens with it as without it, and counted hits, on the tiny model (float32).

Two engines side by side, one with the cache and one without (``prefix_cache: false``), answer the same requests;
the unit tests at the end check the cache's keys, its LRU order and a prefill from an offset against a whole one.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch

from inhouse.config import TransformersSpec
from inhouse.engine.base import GenerateRequest, Generation, SamplingParams
from inhouse.engine.local.engine import LocalEngine
from inhouse.engine.local.kv_cache import SlotKVCache
from inhouse.engine.local.kv_tiers import KVTiers
from inhouse.engine.local.prefix_cache import BLOCK, PrefixCache
from tests.tiny_lora import RECIPES, build_adapter

TOKENS = 12
ADAPTER = RECIPES[0]


def ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 520) for _ in range(n)]


CONTEXT = ids(3 * BLOCK + 20, seed=1)  # a shared "system prompt + retrieved context": three whole blocks
QUESTIONS = [ids(9 + i, seed=10 + i) for i in range(4)]


async def start(tiny_model_dir: Path, cache_dir: Path, adapter: Path, **options: object) -> LocalEngine:
    spec = TransformersSpec(name="tiny", path=str(tiny_model_dir), dtype="float32", max_num_seqs=8,
                            max_waiting=16, **options)  # type: ignore[arg-type]
    engine = LocalEngine(spec, cache_dir)
    await engine.start()
    await engine.load_adapter(ADAPTER.name, adapter)
    return engine


@pytest.fixture(scope="module")
def adapter(tiny_model_dir: Path, cache_dir: Path) -> Path:
    return build_adapter(tiny_model_dir, ADAPTER, cache_dir / f"tiny-lora-{ADAPTER.name}")


@pytest.fixture(scope="module")
async def cached(tiny_model_dir: Path, cache_dir: Path, adapter: Path) -> AsyncIterator[LocalEngine]:
    engine = await start(tiny_model_dir, cache_dir, adapter)
    yield engine
    await engine.close()


@pytest.fixture(scope="module")
async def uncached(tiny_model_dir: Path, cache_dir: Path, adapter: Path) -> AsyncIterator[LocalEngine]:
    engine = await start(tiny_model_dir, cache_dir, adapter, prefix_cache=False)
    yield engine
    await engine.close()


def request(i: int, prompt: list[int], adapter: str | None = None) -> GenerateRequest:
    sampling = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
    return GenerateRequest(f"r{i}", sampling, prompt=tuple(prompt), adapter=adapter)


async def answer(generation: Generation) -> str:
    return "".join([delta.text async for delta in generation])


async def answers(engine: LocalEngine, prompts: list[list[int]], adapter: str | None = None,
                  together: bool = False) -> list[str]:
    """Greedy answers, one request after the other (or all submitted at once: ``together``)."""
    if together:
        generations = await engine.submit([request(i, p, adapter) for i, p in enumerate(prompts)])
        return list(await asyncio.gather(*(answer(g) for g in generations)))
    return [await answer((await engine.submit([request(i, p, adapter)]))[0]) for i, p in enumerate(prompts)]


async def test_the_same_prompt_twice_hits_and_answers_the_same(cached: LocalEngine, uncached: LocalEngine) -> None:
    prompt = ids(2 * BLOCK + 5, seed=2)
    before = cached.stats()
    first, second = await answers(cached, [prompt, prompt])
    after = cached.stats()
    assert first == second == (await answers(uncached, [prompt]))[0]
    assert after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens == 2 * BLOCK  # the second one's
    assert after.prefix_cache_miss_tokens - before.prefix_cache_miss_tokens == len(prompt) + 5
    assert uncached.stats().prefix_cache_hit_tokens == 0 and uncached.stats().prefix_cache_bytes == 0


async def test_a_shared_context_with_different_questions(cached: LocalEngine, uncached: LocalEngine) -> None:
    prompts = [CONTEXT + q for q in QUESTIONS]
    before = cached.stats().prefix_cache_hit_tokens
    got = await answers(cached, prompts)
    assert got == await answers(uncached, prompts)
    assert len(set(got)) > 1, "the questions get the same answer: the test would prove little"
    assert cached.stats().prefix_cache_hit_tokens - before >= 3 * 3 * BLOCK  # the three later questions at least


async def test_concurrent_requests_sharing_a_prefix(cached: LocalEngine, uncached: LocalEngine) -> None:
    context = ids(2 * BLOCK + 3, seed=3)
    prompts = [context + q for q in QUESTIONS] * 2
    cold = await answers(cached, prompts, together=True)  # one batched prefill: nothing cached yet
    warm = await answers(cached, prompts, together=True)  # every one from the cache, batched
    assert cold == warm == await answers(uncached, prompts, together=True)


async def test_an_adapter_never_reuses_the_base_blocks(cached: LocalEngine, uncached: LocalEngine) -> None:
    prompt = ids(2 * BLOCK + 7, seed=4)
    base = await answers(cached, [prompt])
    hits = cached.stats().prefix_cache_hit_tokens
    with_adapter = await answers(cached, [prompt], ADAPTER.name)
    assert cached.stats().prefix_cache_hit_tokens == hits  # the base's blocks are not the adapter's
    assert with_adapter == await answers(uncached, [prompt], ADAPTER.name)
    assert with_adapter != base, "the adapter has no visible effect: the test would prove nothing"
    again = await answers(cached, [prompt], ADAPTER.name)
    assert again == with_adapter and cached.stats().prefix_cache_hit_tokens == hits + 2 * BLOCK


async def test_eviction_under_a_tiny_budget_keeps_answers(tiny_model_dir: Path, cache_dir: Path, adapter: Path,
                                                          uncached: LocalEngine) -> None:
    prompts = [ids(2 * BLOCK + 9, seed=20 + i) for i in range(4)]
    engine = await start(tiny_model_dir, cache_dir, adapter, prefix_cache_gib=3 * BLOCK * 1024 / 2**30)
    try:
        assert engine._prefix is not None and engine._prefix.block_bytes == BLOCK * 1024  # 2 layers, 1 kv head, 64
        got = await answers(engine, prompts + prompts[::-1])
        stats = engine.stats()
        assert got == await answers(uncached, prompts + prompts[::-1])
        assert stats.prefix_cache_evictions > 0
        assert stats.prefix_cache_bytes <= 3 * BLOCK * 1024
        assert stats.prefix_cache_hit_tokens > 0  # the last prompt, then the one before, were still held
    finally:
        await engine.close()


async def test_a_prompts_blocks_are_kept_after_its_first_token_is_handed_out(
        cached: LocalEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Copying a long prompt's blocks into the cache took 45-65 ms; its first token does not wait for it.  A prompt
    answered at its first token (max_tokens 1) is still kept, as its whole answer."""
    prefix = cached._prefix
    assert prefix is not None
    kept: list[tuple[int, int]] = []  # (tokens saved, output tokens the request had by then)
    save = prefix.save

    def recording(tokens: list[int], *args: Any) -> None:
        outputs = [len(s.output_ids) for s in cached._admitted.values() if s.prompt_ids == tokens[: len(s.prompt_ids)]]
        kept.append((len(tokens), max(outputs, default=-1)))
        save(tokens, *args)

    monkeypatch.setattr(prefix, "save", recording)
    prompt = ids(2 * BLOCK + 7, seed=40)
    await answers(cached, [prompt])
    assert kept[0] == (len(prompt), 1)  # the prompt, once its first token was out
    one = ids(2 * BLOCK + 3, seed=41)
    generation = (await cached.submit([GenerateRequest("one", SamplingParams(max_tokens=1, temperature=0.0),
                                                       prompt=tuple(one))]))[0]
    await answer(generation)
    hits = cached.stats().prefix_cache_hit_tokens
    await answers(cached, [one])
    assert cached.stats().prefix_cache_hit_tokens == hits + 2 * BLOCK


# ---- the cache alone ---------------------------------------------------------------------------


def slot_cache() -> SlotKVCache:
    cache = SlotKVCache(num_layers=2, kv_heads=1, head_dim=4, bound=1024, dtype=torch.float32,
                        device=torch.device("cpu"))
    cache.reserve(2, 1)
    return cache


def test_keys_chain_over_blocks_and_never_cover_the_last_token() -> None:
    prefix = PrefixCache(slot_cache().bytes_per_token, 2**20, "m")
    assert len(prefix.keys(list(range(2 * BLOCK)), None)) == 1  # the last token stays out: one whole block
    assert len(prefix.keys(list(range(2 * BLOCK + 1)), None)) == 2
    a, b = prefix.keys([1] * BLOCK + [2] * BLOCK + [3], None), prefix.keys([9] * BLOCK + [2] * BLOCK + [3], None)
    assert a[1] != b[1]  # the same tokens after a different prefix: another key
    assert prefix.keys([1] * (BLOCK + 1), "x") != prefix.keys([1] * (BLOCK + 1), None)
    assert PrefixCache(slot_cache().bytes_per_token, 2**20, "other").keys([1] * (BLOCK + 1), None) != a[:1]


def test_load_copies_what_save_kept_and_lru_drops_leaves_first() -> None:
    cache = slot_cache()
    prefix = PrefixCache(slot_cache().bytes_per_token, 3 * BLOCK * cache.bytes_per_token, "m")
    cache.reserve(2, 3 * BLOCK + 1)
    with torch.inference_mode():  # the cache's tensors are inference tensors
        for layer in range(2):
            cache.keys[layer][0].normal_()
            cache.values[layer][0].normal_()
    long_prompt = list(range(3 * BLOCK + 1))
    prefix.save(long_prompt, None, cache, 0)
    assert prefix.held_bytes == 3 * prefix.block_bytes
    assert prefix.load(long_prompt, None, cache, 1) == 3 * BLOCK
    for layer in range(2):
        assert torch.equal(cache.keys[layer][1, :, : 3 * BLOCK], cache.keys[layer][0, :, : 3 * BLOCK])
        assert torch.equal(cache.values[layer][1, :, : 3 * BLOCK], cache.values[layer][0, :, : 3 * BLOCK])
    other = [7] * (BLOCK + 1)
    prefix.save(other, None, cache, 0)  # one block in: the long chain's last block goes, not its first
    assert prefix.evictions == 1
    assert prefix.load(long_prompt, None, cache, 1) == 2 * BLOCK
    assert prefix.load(other, None, cache, 1) == BLOCK


def test_a_budget_below_one_block_keeps_nothing() -> None:
    cache = slot_cache()
    prefix = PrefixCache(slot_cache().bytes_per_token, BLOCK * cache.bytes_per_token - 1, "m")
    prefix.save(list(range(2 * BLOCK + 1)), None, cache, 0)
    assert prefix.held_bytes == 0 and prefix.load(list(range(2 * BLOCK + 1)), None, cache, 1) == 0


def test_a_lower_limit_evicts_at_once_and_bounds_what_is_kept() -> None:
    cache = slot_cache()
    prefix = PrefixCache(slot_cache().bytes_per_token, 2**20, "m")
    cache.reserve(2, 4 * BLOCK + 1)
    prefix.save(list(range(4 * BLOCK + 1)), None, cache, 0)
    assert prefix.held_bytes == 4 * prefix.block_bytes
    prefix.limit(2 * prefix.block_bytes)  # the running sequences took the rest of the KV budget
    assert prefix.held_bytes == 2 * prefix.block_bytes and prefix.evictions == 2
    assert prefix.load(list(range(4 * BLOCK + 1)), None, cache, 1) == 2 * BLOCK  # the chain's start stays
    prefix.save([5] * (2 * BLOCK + 1), None, cache, 0)  # within the limit still
    assert prefix.held_bytes <= 2 * prefix.block_bytes
    prefix.limit(0)
    assert prefix.held_bytes == 0
    prefix.save([6] * (2 * BLOCK + 1), None, cache, 0)
    assert prefix.held_bytes == 0


@pytest.mark.parametrize("new_tokens", [30, 200])  # fewer new tokens than cached ones (masked), more (causal)
async def test_a_prefill_from_an_offset_equals_a_whole_one(cached: LocalEngine, new_tokens: int) -> None:
    """The runner itself: logits of a prompt whose first block is already in its slot, against the whole prompt,
    for both ways attention runs after a prefix."""
    from inhouse.engine.local.runner import ModelRunner

    assert cached._loaded is not None
    config = cached._loaded.model.config
    tiers: KVTiers[Any] = KVTiers(num_layers=config.num_hidden_layers, kv_heads=config.num_key_value_heads,
                                  head_dim=config.hidden_size // config.num_attention_heads, max_length=512,
                                  dtype=torch.float32, device=torch.device("cpu"))
    runner = ModelRunner(cached._loaded.model, tiers, torch.device("cpu"))

    class Row:
        def __init__(self, prompt: list[int], cached: int) -> None:
            self.prompt_ids, self.cached, self.adapter = prompt, cached, None
            self.length, self.last_token = len(prompt), prompt[-1]
            self.tier = self.slot = -1

    prompt = ids(BLOCK + new_tokens, seed=5)
    first, second = Row(prompt, 0), Row(prompt, BLOCK)
    cache = tiers.place(first, len(prompt))
    assert tiers.place(second, len(prompt)) is cache and (first.slot, second.slot) == (0, 1)
    whole = runner.prefill([first])
    cache.move(0, 1, BLOCK)
    rest = runner.prefill([second])
    torch.testing.assert_close(rest, whole, rtol=1e-4, atol=1e-4)
    for layer in range(config.num_hidden_layers):
        torch.testing.assert_close(cache.keys[layer][1, :, : len(prompt)], cache.keys[layer][0, :, : len(prompt)])
