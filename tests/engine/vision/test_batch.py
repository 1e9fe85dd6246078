"""Batched vision requests: which jobs share a ``generate`` call, and that a batch answers exactly as each request
alone (greedy) on LLaVA, Idefics3 and Qwen2-VL — rows with images of different sizes, a text-only row, different
budgets, a stop string, ``ignore_eos`` or not — and that a failing request fails alone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from inhouse.config import model_spec
from inhouse.engine.base import GenerateRequest, SamplingParams
from inhouse.engine.collector import OutputCollector
from inhouse.engine.factory import build_engine
from inhouse.engine.vision.batch import compatible_groups
from inhouse.engine.vision.engine import VisionEngine
from inhouse.engine.vision.job import VisionJob
from inhouse.errors import ErrorCode, InhouseError
from tests.tiny_vlm import build_tiny_idefics3, build_tiny_llava, build_tiny_qwen2_vl


def job(name: str, **sampling: Any) -> VisionJob:
    collector: Any = OutputCollector.__new__(OutputCollector)  # never used: grouping reads only the sampling
    return VisionJob(name, "", [], {}, SamplingParams(**sampling), 4, collector)


def test_jobs_share_a_call_only_with_the_same_sampling_shape() -> None:
    jobs = [job("g1", temperature=0.0), job("s1", temperature=0.7), job("g2", temperature=0.0, top_p=0.5),
            job("g3", temperature=0.0, max_tokens=9), job("seeded1", temperature=0.7, seed=1),
            job("seeded2", temperature=0.7, seed=1), job("s2", temperature=0.7), job("g4", top_k=1),
            job("r", temperature=0.0, repetition_penalty=1.2)]
    groups = [[j.request_id for j in group] for group in compatible_groups(jobs, limit=3)]
    assert groups == [["g1", "g2", "g3"], ["s1", "s2"], ["seeded1"], ["seeded2"], ["g4"], ["r"]]


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "llava": lambda cache: build_tiny_llava(cache / "tiny-llava-c28"),
    "idefics3": lambda cache: build_tiny_idefics3(cache / "tiny-idefics3-t32"),
    "qwen2-vl": lambda cache: build_tiny_qwen2_vl(cache / "tiny-qwen2-vl-p4"),
}


@pytest.fixture(scope="module", params=list(BUILDERS))
async def engine(request: pytest.FixtureRequest, cache_dir: Path) -> AsyncIterator[VisionEngine]:
    path = BUILDERS[request.param](cache_dir)
    built = build_engine(model_spec(name=request.param, path=str(path), dtype="float32", max_num_seqs=4), cache_dir)
    assert isinstance(built, VisionEngine)
    await built.start()
    yield built
    await built.close()


def ask(name: str, max_tokens: int, color: str | None, size: tuple[int, int] = (30, 30),
        stop: tuple[str, ...] = (), ignore_eos: bool = True) -> GenerateRequest:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": "data:..."}}] if color else []
    parts.append({"type": "text", "text": "What is it?" if color else "Say something long."})
    return GenerateRequest(name, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos,
                                                stop=stop),
                           messages=({"role": "user", "content": parts},),
                           images=(Image.new("RGB", size, color),) if color else ())


async def answers(engine: VisionEngine, requests: list[GenerateRequest]) -> list[tuple[str, str | None, int]]:
    """Each request's text, finish reason and completion tokens, all submitted in one call (one batch)."""
    generations = await engine.submit(requests)

    async def drain(generation: Any) -> tuple[str, str | None, int]:
        deltas = [d async for d in generation]
        assert deltas[-1].usage is not None and deltas[-1].usage.prompt_tokens == generation.prompt_tokens
        return "".join(d.text for d in deltas), deltas[-1].finish_reason, deltas[-1].usage.completion_tokens

    return list(await asyncio.gather(*(drain(g) for g in generations)))


async def test_four_requests_together_answer_as_each_alone(engine: VisionEngine) -> None:
    requests = [ask("red", 12, "red"), ask("navy", 5, "navy", (50, 40)), ask("text", 9, None),
                ask("white", 16, "white", (20, 60), ignore_eos=False)]
    alone = [(await answers(engine, [r]))[0] for r in requests]
    together = await answers(engine, requests)
    assert together == alone
    assert [tokens for _, _, tokens in together][:3] == [12, 5, 9]  # each row its own budget
    assert engine.largest_batch == 4  # they did run in one call (no other test submits 4 at once)
    assert all(text for text, _, _ in together)
    # separate calls at the same time: however they meet in batches, the same answers
    separate = await asyncio.gather(*(answers(engine, [r]) for r in requests))
    assert [a for [a] in separate] == alone


async def test_a_stop_string_ends_its_row_only(engine: VisionEngine) -> None:
    [(full, _, _)] = await answers(engine, [ask("full", 16, "teal")])
    stop = full[4:6]
    assert len(stop) == 2 and full.find(stop) >= 1
    cut = ask("cut", 16, "teal", stop=(stop,))
    together = await answers(engine, [cut, ask("other", 16, "red"), ask("text", 16, None)])
    assert together[0][:2] == (full[:full.find(stop)], "stop")
    assert together[1:] == [(await answers(engine, [r]))[0] for r in (ask("other", 16, "red"), ask("t", 16, None))]


class _Poisoned:
    """The real model, except that ``generate`` fails for any batch holding the token ``poison``."""

    def __init__(self, model: Any, poison: int) -> None:
        self._model, self._poison = model, poison

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def generate(self, **inputs: Any) -> Any:
        if bool((inputs["input_ids"] == self._poison).any()):
            raise RuntimeError("poisoned row")
        return self._model.generate(**inputs)


async def test_a_request_that_fails_the_model_fails_alone(engine: VisionEngine) -> None:
    good = [ask("a", 6, "red"), ask("b", 6, None)]
    alone = [(await answers(engine, [r]))[0] for r in good]
    tokenizer = engine._processor.tokenizer
    poison = tokenizer.encode("☃", add_special_tokens=False)[-1]  # a byte no other prompt has
    bad = GenerateRequest("bad", good[0].sampling, messages=({"role": "user", "content": [
        {"type": "text", "text": "a ☃"}]},))
    real = engine._model
    engine._model = _Poisoned(real, poison)
    try:
        generations = await engine.submit([good[0], bad, good[1]])
        results: list[Any] = []
        for generation in generations:
            try:
                deltas = [d async for d in generation]
                results.append(("".join(d.text for d in deltas), deltas[-1].finish_reason))
            except InhouseError as exc:
                results.append(exc.code)
    finally:
        engine._model = real
    assert results == [alone[0][:2], ErrorCode.ENGINE_ERROR, alone[1][:2]]
    assert engine.stats().running == 0 and engine.stats().waiting == 0
