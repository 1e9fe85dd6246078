"""The KV memory budget: kv_cache_gib or a third of free memory, refused at start when one full-context sequence
does not fit, and respected by the running engine (requests wait for memory; none is cut short)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from inhouse.config import TransformersSpec
from inhouse.engine.base import GenerateRequest, ModelLoadError, SamplingParams
from inhouse.engine.local.engine import LocalEngine
from inhouse.engine.local.kv_budget import kv_budget_tokens
from inhouse.engine.local.kv_tiers import KVTiers
from tests.gateway.test_registry import until

GIB = 2**30


def tiers(max_length: int = 512) -> KVTiers[Any]:
    # 2 layers × 1 kv head × 64 × keys and values × 4 bytes: 1,024 bytes a token, like the tiny model
    return KVTiers(num_layers=2, kv_heads=1, head_dim=64, max_length=max_length, dtype=torch.float32,
                   device=torch.device("cpu"))


def test_the_setting_is_the_budget() -> None:
    kv = tiers()
    assert kv.bytes_per_token == 1024
    assert kv_budget_tokens("m", 0.25, kv, max_num_seqs=4) == GIB // 4 // 1024


def test_a_setting_below_one_full_context_is_refused_with_what_it_needs() -> None:
    kv = tiers()
    one = kv.charge(512) + kv.slack
    with pytest.raises(ModelLoadError) as refused:
        kv_budget_tokens("m", (one - 1) * 1024 / GIB, kv, max_num_seqs=4)
    message = str(refused.value)
    assert "'m'" in message and "kv_cache_gib" in message and "512 tokens need" in message
    assert kv_budget_tokens("m", one * 1024 / GIB, kv, max_num_seqs=4) == one


def test_without_a_setting_a_third_of_free_memory_at_most_what_the_sequences_need() -> None:
    kv = tiers()
    most = 4 * 512 + kv.slack
    assert kv_budget_tokens("m", None, kv, max_num_seqs=4, free_bytes=3 * GIB) == most
    assert kv_budget_tokens("m", None, kv, max_num_seqs=4, free_bytes=3 * 5000 * 1024) == 5000
    with pytest.raises(ModelLoadError, match="a third of the free memory"):
        kv_budget_tokens("m", None, kv, max_num_seqs=4, free_bytes=3 * 100 * 1024)


async def test_a_model_whose_budget_cannot_hold_its_context_does_not_start(tiny_model_dir: Path,
                                                                          cache_dir: Path) -> None:
    engine = LocalEngine(TransformersSpec(name="tiny", path=str(tiny_model_dir), dtype="float32",
                                          kv_cache_gib=1e-6), cache_dir)
    with pytest.raises(ModelLoadError, match="kv_cache_gib"):
        await engine.start()


async def test_requests_wait_for_memory_and_all_finish_whole(tiny_model_dir: Path, cache_dir: Path) -> None:
    kv = tiers()
    room = kv.charge(512) + kv.slack  # one full-context sequence, or two of up to 256 tokens
    engine = LocalEngine(TransformersSpec(name="tiny", path=str(tiny_model_dir), dtype="float32", max_num_seqs=8,
                                          kv_cache_gib=room * 1024 / GIB), cache_dir)
    await engine.start()
    try:
        assert engine.stats().kv_cache_budget_bytes == room * 1024
        sampling = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)  # 20 + 60 tokens: charge 256
        generations = await engine.submit([GenerateRequest(f"r{i}", sampling, prompt=tuple([5 + i] * 20))
                                           for i in range(6)])
        most_running = 0

        async def watch() -> None:
            nonlocal most_running
            while True:
                stats = engine.stats()
                most_running = max(most_running, stats.running)
                assert stats.kv_cache_bytes <= stats.kv_cache_budget_bytes
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        counts = []
        for generation in generations:
            counts.append(sum([d.token_count async for d in generation]))
        watcher.cancel()
        assert counts == [60] * 6  # nobody cut short
        assert most_running == 2  # slots for 8, memory for 2
        await until(lambda: engine.stats().running == 0)  # published after the step that finished them
        assert engine.stats().kv_cache_usage == 0.0
        await until(lambda: engine.stats().kv_cache_bytes == 0)  # the tiers go back after two seconds idle
    finally:
        await engine.close()


async def test_the_tiers_outlive_a_request_and_go_back_once_the_engine_is_idle(tiny_model_dir: Path,
                                                                              cache_dir: Path) -> None:
    """Requests one after another reuse the tier the last one left (re-allocating and zeroing a long prompt's tier
    for each cost the RAG workload 7% of the engine's time); two seconds idle, it goes back.  (No prefix cache: its
    1 GiB would leave the tiny model's budget no room for a spare row.)"""
    engine = LocalEngine(TransformersSpec(name="tiny", path=str(tiny_model_dir), dtype="float32", prefix_cache=False),
                         cache_dir)
    await engine.start()
    try:
        [generation] = await engine.submit([GenerateRequest("a", SamplingParams(max_tokens=8, temperature=0.0),
                                                            prompt="hello " * 40)])
        assert sum([d.token_count async for d in generation]) == 8
        await until(lambda: engine.stats().running == 0, within=1.0)
        assert engine.stats().kv_cache_bytes > 0  # finished, and its tier kept
        await until(lambda: engine.stats().kv_cache_bytes == 0)
    finally:
        await engine.close()
