"""A sequence finishes cleanly wherever its limit falls: no half a character, every token counted."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from inhouse.engine.base import Delta, SamplingParams, Usage
from inhouse.engine.collector import OutputCollector
from inhouse.engine.local.detokenizer import IncrementalDetokenizer, StopMatcher
from inhouse.engine.local.sequence import Sequence, SequenceStatus

TEXT = "今天天气很好，我们去公园散步吧🎉🐍。"  # characters the tiny tokenizer keeps as byte tokens


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(tiny_model_dir)


async def generate(tokenizer, tokens: list[int], max_tokens: int, stops: tuple[str, ...] = ()) -> list[Delta]:  # type: ignore[no-untyped-def]
    """Feed ``tokens`` as if sampled, reading each Delta as a streaming client would, until the sequence ends."""
    prompt = tokenizer("prompt:")["input_ids"]
    collector: OutputCollector[Delta] = OutputCollector(asyncio.get_running_loop())
    seq = Sequence("r", prompt, SamplingParams(stop=stops), max_tokens, collector,
                   IncrementalDetokenizer(tokenizer, prompt), StopMatcher(stops))
    deltas = []
    for token in tokens:
        finished = seq.append(token, frozenset({tokenizer.eos_token_id}), None)
        deltas.append(await collector.get())
        if finished:
            break
    assert seq.status is SequenceStatus.FINISHED
    return deltas


@pytest.mark.parametrize("stops", [(), ("never",)])
async def test_a_length_limit_inside_a_character_sends_no_replacement(tokenizer, stops: tuple[str, ...]) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    for limit in range(1, len(ids) + 1):
        deltas = await generate(tokenizer, ids, limit, stops)
        text = "".join(d.text for d in deltas)
        assert "\ufffd" not in text, limit
        assert text == tokenizer.decode(ids[:limit]).removesuffix("\ufffd")
        assert sum(d.token_count for d in deltas) == limit
        assert [d.finish_reason for d in deltas] == [None] * (limit - 1) + ["length"]
        # the usage travels with the finishing delta, and only with it
        prompt = len(tokenizer("prompt:")["input_ids"])
        assert [d.usage for d in deltas] == [None] * (limit - 1) + [Usage(prompt, limit, 0)]


async def test_a_stop_token_after_half_a_character_sends_no_replacement(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    cuts = [cut for cut in range(len(ids)) if tokenizer.decode(ids[:cut]).endswith("\ufffd")]
    assert cuts
    for cut in cuts:
        deltas = await generate(tokenizer, [*ids[:cut], tokenizer.eos_token_id], max_tokens=100)
        text = "".join(d.text for d in deltas)
        assert text == tokenizer.decode(ids[:cut]).removesuffix("\ufffd")
        assert sum(d.token_count for d in deltas) == cut + 1
        assert deltas[-1].finish_reason == "stop"
