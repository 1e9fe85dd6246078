"""PromptBuilder's checks: the cheap size bound never refuses a prompt that fits, token ids and template
arguments are checked, and choices sharing one prompt are tokenized once."""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from inhouse.engine.base import GenerateRequest, SamplingParams
from inhouse.engine.prompt import PromptBuilder
from inhouse.errors import ErrorCode, InhouseError

PIECES = ["hello", " ", "\n", "    ", "你好", "世界", "😀", "é", "Paris", "################", "=" * 30, "\t", "ok."]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> object:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def completion(prompt: str | tuple[int, ...], **sampling: object) -> GenerateRequest:
    return GenerateRequest("r", SamplingParams(**sampling), prompt=prompt)  # type: ignore[arg-type]


async def test_the_size_bound_is_a_lower_bound_on_the_token_count(tokenizer: object) -> None:
    """For any text, the tokens counted are at least the cheap bound, so the bound only refuses what would not fit."""
    builder = PromptBuilder(tokenizer, 600, window=10**9)
    rng = random.Random(7)
    for _ in range(300):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 200)))
        tokens = len(builder.token_ids(completion(text)))
        assert tokens >= len(text.encode()) // builder._units_per_token, text


async def test_a_prompt_far_beyond_the_window_is_refused_by_the_bound(tokenizer: object) -> None:
    builder = PromptBuilder(tokenizer, 600, window=64)
    with pytest.raises(InhouseError) as refused:
        await builder.token_ids_async(completion("你好" * 100_000))
    assert refused.value.code is ErrorCode.CONTEXT_LENGTH_EXCEEDED and "at least" in refused.value.message


async def test_a_long_prompt_is_tokenized_off_the_event_loop_and_under_no_shared_lock(tokenizer: object) -> None:
    """Issue 8: a long prompt tokenized under one lock queued every request behind it.  With the lock held by
    someone else, a long prompt still gets tokenized, in a worker thread."""
    builder = PromptBuilder(tokenizer, 600, window=10**9)
    threads: list[threading.Thread] = []
    encode = builder._encode

    def recording(text: str, special: bool) -> list[int]:
        threads.append(threading.current_thread())
        return encode(text, special)

    builder._encode = recording  # type: ignore[method-assign]
    with builder._lock:
        ids = await asyncio.wait_for(builder.token_ids_async(completion("hello world " * 2000)), 20)
    assert len(ids) >= 2000
    assert threads and threads[0] is not threading.current_thread()


async def test_token_ids_and_stop_token_ids_must_be_in_the_vocabulary(tokenizer: object) -> None:
    builder = PromptBuilder(tokenizer, 600, window=512)
    for request, param in ((completion((1, 600)), "prompt"), (completion((1,), stop_token_ids=(599, 600)),
                                                               "stop_token_ids")):
        with pytest.raises(InhouseError) as refused:
            await builder.token_ids_all([request])
        assert refused.value.param == param and "0..599" in refused.value.message
    with pytest.raises(InhouseError) as empty:
        await builder.token_ids_all([completion(())])
    assert empty.value.param == "prompt"


async def test_reserved_template_arguments_are_refused_by_name(tokenizer: object) -> None:
    builder = PromptBuilder(tokenizer, 600, window=512)
    request = GenerateRequest("r", SamplingParams(), messages=({"role": "user", "content": "hi"},),
                              chat_template_kwargs={"messages": []})
    with pytest.raises(InhouseError) as refused:
        await builder.token_ids_all([request])
    assert refused.value.param == "chat_template_kwargs.messages"


async def test_choices_sharing_one_prompt_are_tokenized_once(tokenizer: object) -> None:
    builder = PromptBuilder(tokenizer, 600, window=512)
    messages = ({"role": "user", "content": "hi"},)
    requests = [GenerateRequest(f"r{i}", SamplingParams(), messages=messages) for i in range(3)]
    calls = 0
    render = builder._render

    def counting(request: GenerateRequest) -> str:
        nonlocal calls
        calls += 1
        return render(request)

    builder._render = counting  # type: ignore[method-assign]
    ids = await builder.token_ids_all(requests)
    assert calls == 1 and ids[0] == ids[1] == ids[2] and ids[0]


def test_chat_is_a_capability_only_with_a_chat_template(tiny_model_dir: Path) -> None:
    from inhouse.engine.base import Capability

    with_template = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert PromptBuilder(with_template, 600, 512).capabilities == {Capability.CHAT, Capability.COMPLETION}
    without = AutoTokenizer.from_pretrained(tiny_model_dir)
    without.chat_template = None
    assert PromptBuilder(without, 600, 512).capabilities == {Capability.COMPLETION}
