"""Incremental detokenization never splits a character; stop strings are cut across any boundary."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from inhouse.engine.local.detokenizer import IncrementalDetokenizer, StopMatcher

TEXTS = [
    "你好，世界！北京是中国的首都。",
    "Emoji: 😀 🚀 👍🏽 ❤️ done",
    "mixed 中文 and English, こんにちは",
    "plain ascii with  double  spaces\nand a newline",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_equals_full_decode(tokenizer, text: str) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=tokenizer("prompt:")["input_ids"])
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # where a character is spread over several byte tokens, some steps must hold text back
    if any("\ufffd" in tokenizer.decode([i]) for i in ids):
        assert "" in pieces[:-1]


def test_random_byte_tokens_stream_equals_decode(tokenizer) -> None:  # type: ignore[no-untyped-def]
    import random

    rng = random.Random(0)
    ids = [rng.randrange(3, len(tokenizer)) for _ in range(300)]
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=[])
    streamed = "".join(detok.add(i) for i in ids) + detok.flush()
    assert streamed == tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("split", range(1, 12))
def test_stop_string_found_across_every_split(split: int) -> None:
    text = "Thought: call tool\nObservation: 42"
    matcher = StopMatcher(("Observation:",))
    out, hit = "", False
    for start in range(0, len(text), split):
        piece, hit = matcher.feed(text[start : start + split])
        out += piece
        if hit:
            break
    assert hit
    assert out == "Thought: call tool\n"


def test_stop_matcher_holds_back_only_possible_prefixes() -> None:
    matcher = StopMatcher(("STOP",))
    assert matcher.feed("abc ST") == ("abc ", False)
    assert matcher.feed("ART") == ("START", False)
    assert matcher.feed(" xS") == (" x", False)
    assert matcher.flush() == "S"


def test_earliest_of_several_stops_wins() -> None:
    matcher = StopMatcher(("world", "lo w"))
    assert matcher.feed("hello world") == ("hel", True)


def test_no_stops_passes_through() -> None:
    assert StopMatcher(()).feed("anything") == ("anything", False)
