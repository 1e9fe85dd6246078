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


# characters the tiny tokenizer never merged: each is two to four byte tokens, so a cut can fall inside it
CUT_TEXTS = [
    "今天天气很好，我们去公园散步吧🎉🐍。",
    "mixed 中文 and English, こんにちは",
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


@pytest.mark.parametrize("text", CUT_TEXTS)
def test_a_cut_inside_a_character_drops_its_bytes_never_sends_a_replacement(tokenizer, text: str) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decodes = [tokenizer.decode(ids[:cut]) for cut in range(len(ids) + 1)]
    assert sum(d.endswith("\ufffd") for d in decodes) >= 5, "the text should be cut inside characters"
    for cut, decoded in enumerate(decodes):
        detok = IncrementalDetokenizer(tokenizer, prompt_ids=tokenizer("prompt:")["input_ids"])
        streamed = "".join(detok.add(i) for i in ids[:cut]) + detok.flush()
        assert "\ufffd" not in streamed, cut
        assert text.startswith(streamed)
        assert streamed == decoded.removesuffix("\ufffd"), "only the unfinished character is dropped"


def test_a_replacement_character_the_model_wrote_is_sent(tokenizer) -> None:  # type: ignore[no-untyped-def]
    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    lone_continuation_byte = encode("龘")[1]  # invalid UTF-8 on its own
    ids = [lone_continuation_byte, *encode(" a"), *encode("\ufffd"), *encode(" b")]
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=[])
    streamed = "".join(detok.add(i) for i in ids) + detok.flush()
    assert streamed == tokenizer.decode(ids) == "\ufffd a\ufffd b"


def test_random_byte_tokens_stream_equals_decode(tokenizer) -> None:  # type: ignore[no-untyped-def]
    import random

    rng = random.Random(0)
    ids = [rng.randrange(3, len(tokenizer)) for _ in range(300)]
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=[])
    streamed = "".join(detok.add(i) for i in ids) + detok.flush()
    decoded = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert streamed == decoded.removesuffix("\ufffd")  # a last unfinished character is dropped


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
